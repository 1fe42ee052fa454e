"""Does the simulated microscope's camera noise match its forward model's parameters?

    scopecast bench sim-noise

Photon transfer on 40 frames of a frozen scene (gain = slope of variance vs mean signal) and a
dark series with the shutter closed (offset, read noise), through the real pymmcore-plus core.
"""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from calibration.sim.presets import PRESETS
from stream.simulated import SimulatedMicroscope


def measure(name: str, frames: int = 40) -> dict[str, float]:
    preset = PRESETS[name].model_copy(
        update={"time_scale": 1e-12, "shape": (512, 512)}
        if name == "celldiscoverer"
        else {"time_scale": 1e-12}
    )
    scope, cam = SimulatedMicroscope(preset, seed=3), preset.camera

    def stack(n: int) -> np.ndarray:
        out = []
        for _ in range(n):
            scope.core.snapImage()
            out.append(scope.core.getImage().astype(np.float64))
        return np.stack(out)

    lit = stack(frames)
    mean, var = lit.mean(0), lit.var(0, ddof=1)
    unclipped = mean < cam.max_adu * 0.9
    gain = np.polyfit(mean[unclipped] - cam.offset_adu, var[unclipped], 1)[0]
    scope.core.setShutterOpen(False)
    dark = stack(frames // 2)
    read_adu = np.sqrt(max(dark.std() ** 2 - 1 / 12, 0))
    return {
        "gain": gain,
        "gain_model": cam.gain_adu_per_electron,
        "offset": dark.mean(),
        "offset_model": cam.offset_adu,
        "read_noise_e": read_adu / cam.gain_adu_per_electron,
        "read_noise_model": cam.read_noise_electrons,
    }


def run() -> None:
    table = Table(
        "preset",
        "gain ADU/e- (model)",
        "offset ADU (model)",
        "read noise e- (model)",
        title="simulated camera noise vs forward model",
    )
    for name in PRESETS:
        m = measure(name)
        table.add_row(
            name,
            f"{m['gain']:.3f} ({m['gain_model']:g})",
            f"{m['offset']:.2f} ({m['offset_model']:g})",
            f"{m['read_noise_e']:.3f} ({m['read_noise_model']:g})",
        )
    Console().print(table)
