"""One rig's calibration profile: camera, optics, scan and reference arrays, on disk as
``profile.json`` (pydantic) plus ``arrays.npz`` (numpy, never pickled).

``serve`` loads it to check fidelity (and, later, to normalize frames), ``train`` to make
training pairs with the rig's own noise, and the simulator to image with the rig's parameters.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from .camera import CameraParams
from .errors import CalibrationError
from .forward import ForwardModel
from .optics import OpticsParams
from .scan import ScanParams

PROFILE = "profile.json"
ARRAYS = "arrays.npz"
#: arrays a profile may carry, all (H, W) at the recorded pixel grid
ARRAY_NAMES = ("offset_map", "read_noise_map", "flat_field", "hot_pixels", "dead_pixels",
               "background")  # fmt: skip


class CalibrationProfile(BaseModel):
    """What scopecast knows about one rig; each ``scopecast calibrate`` step fills a part."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    rig: str = Field("rig", description="name of the microscope this profile describes")
    created: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    pixel_size_um: float = Field(gt=0, description="recorded pixel size at the sample")
    camera: CameraParams = CameraParams()
    optics: OpticsParams = OpticsParams()
    scan: ScanParams = ScanParams()
    psf_sigma_um: float | None = Field(None, description="measured PSF width (Gaussian sigma)")
    focus_z_um: float | None = Field(None, description="focus found by the defocus series")
    defocus_slope: float | None = Field(None, description="blur sigma per um of defocus")
    measured: dict[str, Any] = Field(
        default_factory=dict, description="what each step measured and how (provenance)"
    )
    _arrays: dict[str, np.ndarray] = PrivateAttr(default_factory=dict)

    def array(self, name: str) -> np.ndarray | None:
        """One of :data:`ARRAY_NAMES`, or None if this profile does not have it."""
        if name not in ARRAY_NAMES:
            raise KeyError(f"{name!r} is not a profile array; one of {ARRAY_NAMES}")
        return self._arrays.get(name)

    def with_arrays(self, **arrays: np.ndarray | None) -> CalibrationProfile:
        """A copy with these arrays set (None removes one)."""
        unknown = set(arrays) - set(ARRAY_NAMES)
        if unknown:
            raise KeyError(f"unknown profile arrays {sorted(unknown)}; allowed: {ARRAY_NAMES}")
        new = self.model_copy()
        new._arrays = {
            **self._arrays,
            **{k: np.asarray(v) for k, v in arrays.items() if v is not None},
        }
        for k, v in arrays.items():
            if v is None:
                new._arrays.pop(k, None)
        return new

    def updated(self, **fields: Any) -> CalibrationProfile:
        """A validated copy with ``fields`` replaced; arrays carried over."""
        data = {**self.model_dump(), **fields}
        new = type(self).model_validate(data)
        new._arrays = dict(self._arrays)
        return new

    def forward_model(self) -> ForwardModel:
        """The forward model with this rig's parameters."""
        return ForwardModel(
            camera=self.camera,
            optics=self.optics,
            scan=self.scan,
            pixel_size_um=self.pixel_size_um,
            focus_z_um=self.focus_z_um or 0.0,
        )

    def save(self, directory: Path) -> Path:
        """Write ``profile.json`` and ``arrays.npz`` into ``directory``; return the JSON path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._arrays:
            # allow_pickle is numpy's default, spelled out so no array name can be taken for it
            np.savez_compressed(directory / ARRAYS, allow_pickle=True, **self._arrays)
        else:
            (directory / ARRAYS).unlink(missing_ok=True)
        path = directory / PROFILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> CalibrationProfile:
        """Read a profile folder (or its ``profile.json``); arrays are loaded without pickle."""
        path = Path(path)
        json_path = path / PROFILE if path.is_dir() else path
        if not json_path.is_file():
            raise CalibrationError(
                f"no calibration profile at {path}: create one with `scopecast calibrate camera "
                f"--profile {path}`"
            )
        try:
            profile = cls.model_validate(json.loads(json_path.read_text()))
        except (ValueError, ValidationError) as e:
            raise CalibrationError(f"{json_path} is not a valid calibration profile: {e}") from e
        npz = json_path.parent / ARRAYS
        if npz.exists():
            with np.load(npz, allow_pickle=False) as arrays:
                unknown = set(arrays.files) - set(ARRAY_NAMES)
                if unknown:
                    raise CalibrationError(f"{npz} holds unknown arrays {sorted(unknown)}")
                profile._arrays = {k: arrays[k] for k in arrays.files}
        return profile
