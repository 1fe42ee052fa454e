"""Synthetic annotated data: ``scopecast synthesize`` (label time-lapses of cells from
:mod:`calibration.sim.masks`). Torch-free."""
