"""The offline part of engines: ONNX export and TensorRT plan builds (with models/ and train/).
Nothing in the live path (package, runtime, tiling, engine, zoo) imports it."""
