"""Generators, discriminators and ONNX export: shapes, errors, rebuild from config, parity with
onnxruntime on several input sizes, tGAN's determinism. Tiny sizes, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

# these import torch: only once the importorskip above has passed
from engines.models import (  # noqa: E402
    DISCRIMINATORS,
    GENERATORS,
    TemporalGenerator,
    build_discriminator,
    build_generator,
    count_parameters,
)
from engines.models.onnx_export import (  # noqa: E402
    ParityError,
    check_parity,
    example_inputs,
    export_onnx,
)
from engines.models.tgan import NoiseInjection  # noqa: E402

H, W = 16, 24  # multiples of every tiny and small generator's `multiple`


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(g, n: int = 2, h: int = H, w: int = W) -> dict:
    return example_inputs(g, n, h, w)


def _noisy(g: TemporalGenerator, value: float = 0.5) -> TemporalGenerator:
    for m in g.modules():
        if isinstance(m, NoiseInjection):
            m.weight.data.fill_(value)
    return g


SHAPE_CASES = [
    (arch, size, scale)
    for arch in GENERATORS
    for size in ("tiny", "small")
    for scale in ((1, 2, 4) if arch == "rrdb" else (1, 2))
]


@pytest.mark.parametrize(("arch", "size", "scale"), SHAPE_CASES)
def test_generator_output_shape(arch: str, size: str, scale: int) -> None:
    g = build_generator(arch, size, scale=scale).eval()
    assert H % g.multiple == 0 and W % g.multiple == 0
    with torch.no_grad():
        out = g(**_inputs(g))
    assert out.shape == (2, 1, H * scale, W * scale)
    assert torch.isfinite(out).all()
    assert g.input_names == ["frames"]
    assert g.receptive_radius > 0


@pytest.mark.parametrize("arch", ["unet", "rrdb", "ciegan"])
def test_single_encoder_generators_take_temporal_inputs(arch: str) -> None:
    g = build_generator(arch, "tiny", scale=2, window=3, previous=True, background=True, channels=2)
    assert g.input_names == ["frames", "previous", "background"]
    inputs = _inputs(g)
    assert inputs["frames"].shape == (2, 6, H, W)
    assert g(**inputs).shape == (2, 2, 2 * H, 2 * W)


@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("previous", [False, True])
@pytest.mark.parametrize("background", [False, True])
def test_tgan_inputs(scale: int, window: int, previous: bool, background: bool) -> None:
    g = build_generator(
        "tgan", "tiny", scale=scale, window=window, previous=previous, background=background
    )
    expected = ["frames"] + ["previous"] * previous + ["background"] * background
    assert g.input_names == expected
    inputs = _inputs(g)
    assert list(inputs) == expected
    out = g(**inputs)
    assert out.shape == (2, 1, H * scale, W * scale)
    out.mean().backward()
    assert g.encode_frames.levels[0][0].weight.grad is not None
    if previous:
        assert g.encode_previous.levels[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list(GENERATORS))
def test_wrong_height_is_a_clear_error(arch: str) -> None:
    g = build_generator(arch, "small")
    m = g.multiple
    assert m > 1
    with pytest.raises(ValueError, match=rf"H={2 * m + 1} is not a multiple of {m}: pad to"):
        g(torch.zeros(1, 1, 2 * m + 1, 2 * m))


def test_input_errors_name_the_bad_values() -> None:
    g = build_generator("tgan", "tiny", window=2, previous=True)
    good = _inputs(g)
    with pytest.raises(ValueError, match=r"frames must be \(N, 2, H, W\).*got \(2, 3, 16, 24\)"):
        g(torch.zeros(2, 3, H, W), good["previous"])
    with pytest.raises(ValueError, match="built with previous=True: pass previous"):
        g(good["frames"])
    with pytest.raises(ValueError, match=r"previous must have shape \(2, 1, 16, 24\)"):
        g(good["frames"], torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="built with background=False"):
        g(good["frames"], good["previous"], torch.zeros(2, 1, H, W))
    with pytest.raises(ValueError, match="scale must be one of"):
        build_generator("unet", scale=3)
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        build_generator("rrdb", window=0)
    with pytest.raises(ValueError, match="noise must be one of"):
        build_generator("tgan", noise="sometimes")


def test_build_errors_list_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown generator 'nope'.*ciegan, rrdb, tgan, unet"):
        build_generator("nope")
    with pytest.raises(ValueError, match=r"unknown size 'huge'.*small.*large"):
        build_generator("unet", "huge")
    with pytest.raises(ValueError, match=r"no option 'widht'.*features"):
        build_generator("unet", widht=3)
    with pytest.raises(ValueError, match=r"unknown discriminator 'nope'.*cnn, patchgan, unet-sn"):
        build_discriminator("nope")


@pytest.mark.parametrize("arch", list(GENERATORS))
def test_rebuild_from_config(arch: str) -> None:
    g = build_generator(arch, "tiny", scale=2, window=2, previous=True, background=True)
    cfg = json.loads(json.dumps(g.config()))
    assert cfg == g.config()
    h = GENERATORS[arch].from_config(cfg)
    assert type(h) is type(g) and h.config() == g.config()
    assert {k: v.shape for k, v in h.state_dict().items()} == {
        k: v.shape for k, v in g.state_dict().items()
    }
    assert count_parameters(h) == count_parameters(g) > 0
    h.load_state_dict(g.state_dict())
    inputs = _inputs(g)
    with torch.no_grad():
        torch.testing.assert_close(h.eval()(**inputs), g.eval()(**inputs))
    other = next(a for a in GENERATORS if a != arch)
    with pytest.raises(ValueError, match=f"got arch '{other}'"):
        GENERATORS[arch].from_config({**cfg, "arch": other})


def test_tgan_noise_modes() -> None:
    g = _noisy(build_generator("tgan", "tiny", window=2, previous=True, background=True))
    inputs = _inputs(g)
    with torch.no_grad():
        g.eval()
        a, b = g(**inputs), g(**inputs)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        g.train()
        c, d = g(**inputs), g(**inputs)
        assert not torch.equal(c, d)
        g.noise = "off"
        torch.testing.assert_close(g(**inputs), a, rtol=0, atol=0)
        g.noise = "fixed"
        e = g(**inputs)
        assert not torch.equal(e, a)
        torch.testing.assert_close(g(**inputs), e, rtol=0, atol=0)
        g.eval()
        torch.testing.assert_close(g(**inputs), e, rtol=0, atol=0)
        big = _inputs(g, 1, 2 * H, W + 8)
        torch.testing.assert_close(g(**big), g(**big), rtol=0, atol=0)
    assert g.config()["noise"] == "fixed"


def _onnx_dims(path: Path) -> dict[str, list]:
    model = onnx.load(str(path))
    dims = {}
    for value in [*model.graph.input, *model.graph.output]:
        shape = value.type.tensor_type.shape.dim
        dims[value.name] = [d.dim_param or d.dim_value for d in shape]
    return dims


PARITY_CASES = [
    ("unet", "small", {}),
    ("unet", "tiny", {"scale": 2, "window": 2, "previous": True, "background": True}),
    ("rrdb", "small", {}),
    ("rrdb", "tiny", {"scale": 4}),
    ("ciegan", "small", {"scale": 2}),
    ("tgan", "small", {}),
    ("tgan", "tiny", {"scale": 2, "window": 3, "previous": True, "background": True}),
]


@pytest.mark.parametrize(("arch", "size", "kw"), PARITY_CASES)
def test_onnx_export_parity(tmp_path: Path, arch: str, size: str, kw: dict) -> None:
    g = build_generator(arch, size, **kw)
    if isinstance(g, TemporalGenerator):
        _noisy(g)
    g.train()
    path = export_onnx(g, tmp_path / "model.onnx", example_hw=(32, 32))
    assert g.training and getattr(g, "noise", "train") == "train"  # modes restored
    dims = _onnx_dims(path)
    assert list(dims) == [*g.input_names, "enhanced"]
    up = ("N", 1, "h", "w") if g.scale == 1 else ("N", 1, "H", "W")
    assert dims["frames"] == ["N", g.in_channels, "h", "w"]
    assert dims["enhanced"] == list(up)
    error = check_parity(g, path, sizes=((1, 48, 64), (2, 64, 32)))
    assert error < 1e-4


def test_parity_failure_reports_numbers(tmp_path: Path) -> None:
    g = build_generator("unet", "tiny")
    path = export_onnx(g, tmp_path / "model.onnx")
    with torch.no_grad():
        g.tail.conv.bias.add_(1.0)
    with pytest.raises(ParityError, match=r"max relative error .* > rtol 1.0e-04 \(\(N, h, w\)"):
        check_parity(g, path)
    with pytest.raises(ParityError, match=r"\(N, h, w\)=\(1, 32, 36\)"):
        check_parity(g, path, sizes=((1, 30, 33),))  # rounded up to multiples of 4
    with pytest.raises(ValueError, match="example w=30 must be a positive multiple of 4"):
        export_onnx(g, tmp_path / "bad.onnx", example_hw=(32, 30))


def test_receptive_radius_bounds_the_gradient() -> None:
    models = [build_generator(a, "tiny") for a in ("unet", "rrdb")]
    models.append(build_generator("rrdb", "tiny", unshuffle=True))
    for g in models:
        size = 2 * g.receptive_radius + 24
        size += -size % g.multiple
        x = torch.rand(1, 1, size, size, requires_grad=True)
        c = size // 2
        g(x)[0, 0, c, c].backward()
        rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
        reach = max((rows - c).abs().max(), (cols - c).abs().max())
        assert 0 < reach <= g.receptive_radius


DISC_CASES = [
    # arch, in_channels, candidate (N, C, H, W), condition or None, expected output shape
    ("patchgan", 4, (2, 1, 64, 64), (2, 3, 32, 32), (2, 1, 6, 6)),
    ("patchgan", 1, (2, 1, 32, 48), None, (2, 1, 2, 4)),
    ("unet-sn", 2, (2, 1, 32, 40), (2, 1, 32, 40), (2, 1, 32, 40)),
    ("cnn", 3, (2, 1, 32, 32), (2, 2, 16, 16), (2, 1)),
]


@pytest.mark.parametrize(("arch", "cin", "cand", "cond", "out"), DISC_CASES)
def test_discriminator_shapes_and_gradients(arch, cin, cand, cond, out) -> None:
    extra = {"layers": 3} if arch == "patchgan" else {}  # the 70x70 PatchGAN
    d = build_discriminator(arch, "tiny", in_channels=cin, **extra)
    candidate = torch.rand(cand, requires_grad=True)
    condition = None if cond is None else torch.rand(cond)
    logits = d(candidate, condition)
    assert logits.shape == out
    (grad,) = torch.autograd.grad(logits.square().mean(), candidate, create_graph=True)
    assert grad.abs().sum() > 0
    (logits.mean() + grad.square().sum()).backward()  # WGAN-GP differentiates twice
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert type(d).from_config(json.loads(json.dumps(d.config()))).config() == d.config()


def test_discriminator_errors() -> None:
    d = build_discriminator("patchgan", "tiny", in_channels=4)
    with pytest.raises(ValueError, match="built for 4 input channels but got candidate 1 \\+ "
                       "condition 1: build it with in_channels=2"):  # fmt: skip
        d(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8, got 36x32"):
        build_discriminator("unet-sn", "tiny")(torch.rand(1, 1, 36, 32))


def test_patchgan_attention_is_linear_in_pixels() -> None:
    d = build_discriminator("patchgan", "tiny", in_channels=1)
    with torch.no_grad():
        d.body[2].gamma.fill_(1.0)
        assert d(torch.rand(1, 1, 256, 256)).shape == (1, 1, 62, 62)
    assert set(DISCRIMINATORS) == {"patchgan", "unet-sn", "cnn"}
