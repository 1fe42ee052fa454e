"""Measure a rig through pymmcore-plus and fit its calibration profile: ``scopecast calibrate``.

Each step acquires what it needs (dark and flat series, a bead field, a z-series, a scanned
specimen), fits it with :mod:`calibration`, and updates the profile folder (``profile.json``,
``arrays.npz`` and plots). On the simulated microscope the right slide goes under the objective
by itself (its ``Sample`` device); on a real rig the command says which slide to put there and
waits for Enter (``--yes`` skips the question when the slide is already in place).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from pymmcore_plus import CMMCorePlus

from calibration.bidir import estimate_phase
from calibration.errors import CalibrationError
from calibration.profile import CalibrationProfile
from calibration.psf import DefocusFit, PsfFit, defocus_range_um, fit_defocus, fit_psf
from calibration.ptc import CameraCalibration, fit_camera, plot_ptc

from .console import ScopecastGroup

Ask = Callable[[str], None]

#: what each calibration slide is, for a person at a real microscope
SLIDES = {
    "Flat": "uniform slide (fluorescent plastic or dye film; in transmitted light an empty well)",
    "Beads": "slide of sub-resolution fluorescent beads (100 nm or smaller), sparse",
    "Specimen": "specimen with structure across the whole field",
}


def snap_stack(core: CMMCorePlus, n: int, exposure_ms: float | None = None) -> np.ndarray:
    """``n`` frames snapped one after another (N, H, W)."""
    if exposure_ms is not None:
        core.setExposure(exposure_ms)
    frames = []
    for _ in range(n):
        core.snapImage()
        frames.append(core.getImage().copy())
    return np.stack(frames)


@contextmanager
def slide(core: CMMCorePlus, label: str, ask: Ask | None) -> Iterator[None]:
    """Put the ``label`` slide under the objective for the duration of the block."""
    if "Sample" in core.getLoadedDevices():
        before = core.getProperty("Sample", "Label")
        core.setProperty("Sample", "Label", label)
        try:
            yield
        finally:
            core.setProperty("Sample", "Label", before)
        return
    if ask is not None:
        ask(f"put a {SLIDES[label]} under the objective, in focus")
    yield


@contextmanager
def darkness(core: CMMCorePlus, ask: Ask | None) -> Iterator[None]:
    """No light on the camera: the shutter closed, or the user covers the light path."""
    shutter = core.getShutterDevice()
    if shutter:
        was_open = core.getShutterOpen()
        core.setShutterOpen(False)
        try:
            yield
        finally:
            core.setShutterOpen(was_open)
        return
    if ask is not None:
        ask("no shutter is configured: block all light to the camera (cap the objective)")
    yield


def auto_exposures(
    core: CMMCorePlus, dark_level: float, bit_depth: int, levels: int, fill: float = 0.4
) -> list[float]:
    """Exposures from dim to ``fill`` of the ADC range above the dark level, geometric."""
    e0 = core.getExposure()
    probe = snap_stack(core, 1, e0)[0].astype(float).mean() - dark_level
    if probe <= 0:
        raise CalibrationError(
            f"the flat slide gives no signal above the dark level ({probe:.1f} ADU at {e0:g} ms):"
            " open the shutter, turn on the light, or check the slide"
        )
    top = e0 * fill * (2**bit_depth - 1 - dark_level) / probe
    return [float(e) for e in np.geomspace(top / 30, top, levels)]


def measure_camera(
    core: CMMCorePlus,
    *,
    frames: int = 16,
    levels: int = 6,
    exposures_ms: list[float] | None = None,
    bit_depth: int | None = None,
    ask: Ask | None = None,
) -> CameraCalibration:
    """Dark series, then flat series at several exposures; fit the photon transfer curve.

    ``bit_depth`` defaults to the core's, which for some cameras is the container's (16)
    rather than the ADC's (e.g. 12): pass the ADC's to detect saturation right."""
    bit_depth = bit_depth or core.getImageBitDepth()
    exposure = core.getExposure()
    try:
        with darkness(core, ask):
            dark = snap_stack(core, frames)
        with slide(core, "Flat", ask):
            exposures_ms = exposures_ms or auto_exposures(
                core, float(dark.mean()), bit_depth, levels
            )
            flats = [snap_stack(core, frames, e) for e in exposures_ms]
    finally:
        core.setExposure(exposure)
    return fit_camera(dark, flats, bit_depth=bit_depth, exposures_ms=exposures_ms)


def measure_psf(
    core: CMMCorePlus, *, frames: int = 8, model: str = "gaussian", ask: Ask | None = None
) -> PsfFit:
    """Average ``frames`` images of a bead slide and fit the PSF."""
    with slide(core, "Beads", ask):
        image = snap_stack(core, frames).astype(np.float32).mean(axis=0)
    return fit_psf(image, pixel_size_um=core.getPixelSizeUm(), model=model)


def measure_defocus(
    core: CMMCorePlus,
    *,
    range_um: float = 3.0,
    steps: int = 13,
    frames: int = 2,
    ask: Ask | None = None,
) -> DefocusFit:
    """A z-series of the bead slide around the current focus; fit blur versus defocus."""
    z0 = core.getPosition()
    zs = z0 + np.linspace(-range_um, range_um, steps)
    planes = []
    try:
        with slide(core, "Beads", ask):
            for z in zs:
                core.setPosition(float(z))
                planes.append(snap_stack(core, frames).astype(np.float32).mean(axis=0))
    finally:
        core.setPosition(z0)
    return fit_defocus(np.stack(planes), zs, pixel_size_um=core.getPixelSizeUm())


def measure_bidir(core: CMMCorePlus, *, frames: int = 8, ask: Ask | None = None) -> float:
    """The bidirectional line phase from ``frames`` images of a structured specimen."""
    with slide(core, "Specimen", ask):
        return estimate_phase(snap_stack(core, frames))


# -- the `scopecast calibrate` command group ---------------------------------------------------

app = typer.Typer(
    cls=ScopecastGroup,
    name="calibrate",
    help="Measure a rig (camera noise, PSF, defocus, scan phase), register image pairs, and "
    "keep it all in a calibration profile folder.",
    no_args_is_help=True,
)

Preset = Annotated[
    str | None, typer.Option(help="simulated microscope preset (default confocal-20fps)")
]
Config = Annotated[Path | None, typer.Option(help="Micro-Manager config file of a real rig")]
ProfileDir = Annotated[Path, typer.Option("--profile", help="profile folder to create or update")]
Yes = Annotated[bool, typer.Option("--yes", help="do not ask: the right slide is in place")]


def _core(preset: str | None, config: Path | None) -> tuple[CMMCorePlus, str, int | None]:
    """The core to measure, the rig's name, and its ADC bit depth when known."""
    from . import acquire as acq

    if config and preset:
        raise acq.SetupError("give either --config (a real rig) or --preset (simulated)")
    if config:
        return acq.load_config(config), config.stem, None
    scope = acq.simulated(preset or "confocal-20fps", 0)
    return scope.core, f"simulated {scope.preset.name}", scope.preset.camera.bit_depth


def _ask(yes: bool) -> Ask | None:
    if yes:
        return None

    def ask(what: str) -> None:
        typer.prompt(f"{what}, then press Enter", default="", show_default=False)

    return ask


def _profile(path: Path, core: CMMCorePlus, rig: str) -> CalibrationProfile:
    if (path / "profile.json").exists():
        return CalibrationProfile.load(path)
    return CalibrationProfile(rig=rig, pixel_size_um=core.getPixelSizeUm() or 1.0)


@app.command()
def camera(
    profile: ProfileDir,
    preset: Preset = None,
    config: Config = None,
    frames: Annotated[int, typer.Option(help="frames per series (at least 8)")] = 16,
    bit_depth: Annotated[
        int | None, typer.Option(help="the camera's ADC bit depth (default: what it reports)")
    ] = None,
    levels: Annotated[int, typer.Option(help="flat levels (exposures), at least 3")] = 6,
    exposure: Annotated[
        list[float] | None, typer.Option(help="flat exposure in ms (repeat); default: automatic")
    ] = None,
    yes: Yes = False,
) -> None:
    """Camera noise: dark and flat series -> offset map, gain, read noise, flat field, bad
    pixels, and a photon transfer plot (ptc.png) beside the profile."""
    core, rig, adc_bits = _core(preset, config)
    cal = measure_camera(core, frames=frames, levels=levels, exposures_ms=exposure,
                         bit_depth=bit_depth or adc_bits, ask=_ask(yes))  # fmt: skip
    p = _profile(profile, core, rig)
    p = p.updated(camera=cal.camera, measured={**p.measured, "camera": cal.ptc})
    p = p.with_arrays(
        offset_map=cal.offset_map, read_noise_map=cal.read_noise_map,
        flat_field=cal.flat_field, hot_pixels=cal.hot_pixels, dead_pixels=cal.dead_pixels,
    )  # fmt: skip
    p.save(profile)
    plot = plot_ptc(cal, profile / "ptc.png")
    c = cal.camera
    typer.echo(
        f"gain {c.gain_adu_per_electron:.3f} ADU/e-, offset {c.offset_adu:.1f} ADU, read "
        f"noise {c.read_noise_electrons:.2f} e-, {int(cal.hot_pixels.sum())} hot and "
        f"{int(cal.dead_pixels.sum())} dead pixels\n{profile / 'profile.json'}\n{plot}"
    )


@app.command()
def optics(
    profile: ProfileDir,
    preset: Preset = None,
    config: Config = None,
    model: Annotated[str, typer.Option(help="PSF model: gaussian or airy")] = "gaussian",
    wavelength: Annotated[
        float | None, typer.Option(help="emission wavelength, nm (default: the profile's)")
    ] = None,
    z_range: Annotated[
        float | None,
        typer.Option(
            help="defocus series +- this many um; 0 skips it; default: where the blur grows to "
            "2.5x the in-focus width measured just before (under 1 um at high NA, several um "
            "at low NA)"
        ),
    ] = None,
    yes: Yes = False,
) -> None:
    """PSF width from a bead slide, and blur versus defocus from a z-series of it."""
    core, rig, _ = _core(preset, config)
    p = _profile(profile, core, rig)
    psf = measure_psf(core, model=model, ask=_ask(yes))
    optics_ = psf.optics(wavelength or p.optics.wavelength_nm, p.optics.refractive_index)
    fields: dict[str, Any] = {"optics": optics_, "psf_sigma_um": psf.sigma_um}
    measured = {"psf": {"sigma_um": psf.sigma_um, "fwhm_um": psf.fwhm_um,
                        "beads": psf.n_beads, "model": psf.model}}  # fmt: skip
    line = (
        f"PSF sigma {psf.sigma_um * 1e3:.0f} nm (FWHM {psf.fwhm_um * 1e3:.0f} nm) "
        f"from {psf.n_beads} beads -> NA {optics_.na:.2f}"
    )
    if z_range is not None and (z_range < 0 or not np.isfinite(z_range)):
        raise CalibrationError(f"--z-range {z_range} must be >= 0 (0 skips the z-series)")
    span = z_range
    if span is None:
        span = defocus_range_um(psf.sigma_um, optics_.na, optics_.refractive_index)
    if span > 0:
        try:
            d = measure_defocus(core, range_um=span, ask=None)
        except CalibrationError as e:
            what = str(e).split(":")[0]  # which planes failed; the advice is given here
            auto = defocus_range_um(psf.sigma_um, optics_.na, optics_.refractive_index)
            change = (
                f"try --z-range {auto:.2g} (where the blur grows 2.5x for the PSF "
                "just measured) or --z-range 0 to skip it"
                if z_range is not None and abs(z_range - auto) > 0.2 * auto
                else "check the bead slide, or --z-range 0 to skip it"
            )
            raise CalibrationError(
                f"the z-series over +-{span:.2g} um failed: {what}; {change}"
            ) from None
        fields.update(focus_z_um=d.focus_z_um, defocus_slope=d.slope)
        measured["defocus"] = {"focus_z_um": d.focus_z_um, "slope": d.slope,
                               "z_um": d.z_um.tolist(),
                               "sigma_um": d.sigma_um.tolist()}  # fmt: skip
        line += (
            f"; focus at z {d.focus_z_um:.2f} um, blur {d.slope:.3f} um per um "
            f"(z-series +-{span:.2g} um)"
        )
    p.updated(**fields, measured={**p.measured, **measured}).save(profile)
    typer.echo(f"{line}\n{profile / 'profile.json'}")


@app.command()
def bidir(
    profile: ProfileDir,
    preset: Preset = None,
    config: Config = None,
    frames: Annotated[int, typer.Option(help="frames to average")] = 8,
    yes: Yes = False,
) -> None:
    """Bidirectional scan phase: the sub-pixel shift between forward and backward lines.
    `scopecast serve --profile P --correct-bidir` undoes it before the engine."""
    core, rig, _ = _core(preset, config)
    p = _profile(profile, core, rig)
    phase = measure_bidir(core, frames=frames, ask=_ask(yes))
    scan = p.scan.model_copy(update={"bidirectional": True, "phase_px": phase})
    p.updated(scan=scan, measured={**p.measured, "bidir": {"phase_px": phase}}).save(profile)
    typer.echo(f"line phase {phase:+.3f} px\n{profile / 'profile.json'}")


@app.command()
def show(profile: Annotated[Path, typer.Argument(help="profile folder")]) -> None:
    """Print a profile: parameters, arrays and what was measured."""
    p = CalibrationProfile.load(profile)
    typer.echo(p.model_dump_json(indent=2, exclude={"measured"}))
    from calibration.profile import ARRAY_NAMES

    for name in ARRAY_NAMES:
        a = p.array(name)
        if a is not None:
            typer.echo(f"{name}: {a.shape} {a.dtype}")


@app.command("register")
def register_pairs(
    low: Annotated[Path, typer.Argument(help="low-quality image (TIFF) or folder of them")],
    high: Annotated[Path, typer.Argument(help="high-quality image or folder, same names")],
    out: Annotated[Path, typer.Option(help="folder for the pairs: OUT/low, OUT/high")],
    scale_hint: Annotated[
        float | None,
        typer.Option(help="low pixel size / high pixel size (2 for a 256 fast scan vs 512 slow)"),
    ] = None,
    upsample: Annotated[
        int, typer.Option(help="high targets on a grid this many times finer than low (SR)")
    ] = 1,
) -> None:
    """Align high-quality images onto low-quality images of the same fields taken on two
    systems (rotation, scale, translation) and write registered, cropped training pairs."""
    from calibration.pairfolder import write_pairs
    from calibration.register import register, registered_pair

    names = _matched(low, high)
    pairs = []
    for name, low_file, high_file in names:
        lo, hi = _read_image(low_file), _read_image(high_file)
        try:
            sim = register(hi, lo, scale_hint=scale_hint)
            hi_reg, lo_crop = registered_pair(hi, lo, sim, upsample=upsample)
        except (CalibrationError, ValueError) as e:
            raise CalibrationError(f"{name} ({low_file} and {high_file}): {e}") from None
        pairs.append((name, lo_crop, hi_reg))
        typer.echo(
            f"{name}: rotation {sim.rotation_deg:+.2f} deg, scale {sim.scale:.4f}, shift "
            f"({sim.shift_yx[0]:+.2f}, {sim.shift_yx[1]:+.2f}) px, score {sim.score:.3f}, "
            f"pair {lo_crop.shape} -> {hi_reg.shape}"
        )
    write_pairs(pairs, out)
    typer.echo(f"{len(pairs)} pairs in {out / 'low'} and {out / 'high'}")


def _read_image(path: Path) -> np.ndarray:
    """One 2-D image from a TIFF, or a CalibrationError saying what is wrong with the file."""
    from calibration.pairfolder import read_tiff

    try:
        image = read_tiff(path)
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    image = np.squeeze(image)
    if image.ndim != 2:
        raise CalibrationError(
            f"{path} holds an image of shape {image.shape}: give one 2-D plane per file"
        )
    return image


def _matched(low: Path, high: Path) -> list[tuple[str, Path, Path]]:
    """(name, low file, high file): two files, or the TIFFs two folders share by name."""
    from calibration.pairfolder import match_files, pair_name

    if low.is_file() and high.is_file():
        return [(pair_name(low), low, high)]
    if not (low.is_dir() and high.is_dir()):
        raise CalibrationError(f"give two TIFF files or two folders, not {low} and {high}")
    try:
        matched = match_files(low, high)
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    if not matched.pairs:
        n_low, n_high = matched.counts
        raise CalibrationError(
            f"no TIFF names shared by {low} ({n_low} files) and {high} ({n_high} files):"
            " name each pair's two images the same"
        )
    return [(p.name, p.low, p.high) for p in matched.pairs]
