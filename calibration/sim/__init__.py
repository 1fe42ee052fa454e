"""The simulated instrument's physics, torch-free and device-free: specimens (``specimen``),
rigs and scenes (``scene``), the table of rigs (``presets``) and true image pairs (``pairs``).

Extension points are tables: a new specimen kind is one :func:`register_specimen` row, a new
rig one :func:`register_preset` row. ``stream.simulated`` wraps a :class:`Scene` in
pymmcore-plus devices.
"""

from .pairs import PairRig
from .presets import PRESETS, get_preset, register_preset
from .scene import ChannelSpec, FocusDrift, Preset, Scene, time_plan
from .specimen import (
    SPECIMEN_KINDS,
    Specimen,
    SpecimenKind,
    View,
    get_specimen_kind,
    register_specimen,
)

__all__ = [
    "PRESETS",
    "SPECIMEN_KINDS",
    "ChannelSpec",
    "FocusDrift",
    "PairRig",
    "Preset",
    "Scene",
    "Specimen",
    "SpecimenKind",
    "View",
    "get_preset",
    "get_specimen_kind",
    "register_preset",
    "register_specimen",
    "time_plan",
]
