"""Forward model of the instrument: clean fine-grid photon flux -> what the camera/scanner
records."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from . import camera as _camera
from .camera import CameraParams
from .optics import OpticsParams, blur
from .scan import ScanParams
from .scan import scan as _scan


class ForwardModel(BaseModel):
    """Optics blur at the fine grid, scan/binning to recorded pixels, then camera noise and
    quantization."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    camera: CameraParams = Field(CameraParams(), description="Detector noise, gain and ADC.")
    optics: OpticsParams = Field(OpticsParams(), description="Objective and PSF.")
    scan: ScanParams = Field(ScanParams(), description="Fine-grid to recorded-pixel sampling.")
    pixel_size_um: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="Recorded pixel size at the sample, µm."
    )
    focus_z_um: float = Field(
        0.0, allow_inf_nan=False, description="Axial position of the focal plane, µm."
    )

    @property
    def fine_pixel_size_um(self) -> float:
        """Pixel size of the fine simulation grid, µm."""
        return self.pixel_size_um / self.scan.downsample

    def expected_photons(self, fine_photons: np.ndarray, z_um: float | None = None) -> np.ndarray:
        """Expected photons per recorded pixel (float32) for a sample plane at `z_um` (None: in
        focus)."""
        fine_photons = np.asarray(fine_photons)
        if fine_photons.ndim != 2:
            raise ValueError(
                f"fine_photons must be a 2-D image, got shape {fine_photons.shape}; "
                "pass one plane at a time."
            )
        dz = 0.0 if z_um is None else z_um - self.focus_z_um
        return _scan(blur(fine_photons, self.optics, self.fine_pixel_size_um, dz), self.scan)

    def record(
        self,
        fine_photons: np.ndarray,
        rng: np.random.Generator | int | None,
        z_um: float | None = None,
        *,
        out: np.ndarray | None = None,
        offset_map: np.ndarray | None = None,
    ) -> np.ndarray:
        """One noisy uint16 frame; an int (or None) `rng` seeds a fresh `np.random.default_rng`.
        ``offset_map`` (column and pixel offsets, the frame's shape) replaces the camera's
        scalar offset."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        return _camera.record(self.expected_photons(fine_photons, z_um), self.camera, rng,
                              out=out, offset_map=offset_map)  # fmt: skip

    def expected_adu(self, fine_photons: np.ndarray, z_um: float | None = None) -> np.ndarray:
        """Noiseless mean ADU per recorded pixel (float32, unclipped)."""
        return _camera.expected_adu(self.expected_photons(fine_photons, z_um), self.camera)
