"""scopecast: calibration."""

from .camera import CameraParams, adu_variance, expected_adu, photons_from_adu, record
from .forward import ForwardModel
from .optics import OpticsParams, blur, defocus_sigma_um, psf_kernel, psf_sigma_um
from .scan import ScanParams, bidirectional_shift, bin_image

__all__ = [
    "CameraParams",
    "ForwardModel",
    "OpticsParams",
    "ScanParams",
    "adu_variance",
    "bidirectional_shift",
    "bin_image",
    "blur",
    "defocus_sigma_um",
    "expected_adu",
    "photons_from_adu",
    "psf_kernel",
    "psf_sigma_um",
    "record",
]
