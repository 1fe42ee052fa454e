"""Generator and discriminator losses for training scopecast engines (torch).

Image losses take float tensors (N, C, H, W) normalized as the engine sees them (C is 1 for our
cameras); ``data_range`` is the span of that normalization (1.0 for [0, 1]). Discriminator
outputs are raw logits of any shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# flow_self_supervised_loss is re-exported: the flow net trains beside the generator's losses.
from engines.models.flow import flow_self_supervised_loss, warp, warp_valid_mask

__all__ = [
    "ADVERSARIAL_KINDS",
    "KNOWN_TERMS",
    "LOSSES",
    "MS_SSIM_WEIGHTS",
    "VGG19_LAYERS",
    "LossTerm",
    "NoiseModel",
    "TermInputs",
    "VGGFeatures",
    "WeightedLoss",
    "adversarial_d",
    "adversarial_g",
    "describe_losses",
    "flow_self_supervised_loss",
    "gradient_penalty",
    "l1",
    "ms_ssim_levels",
    "ms_ssim_loss",
    "mse",
    "perceptual",
    "poisson_gaussian",
    "ssim_loss",
    "style",
    "temporal_warp_loss",
    "total_variation",
]


def _check_images(name: str, *tensors: Tensor) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if any(t.dim() != 4 for t in tensors):
        raise ValueError(f"{name} takes (N, C, H, W) tensors, got shapes {shapes}")
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{name} needs tensors of one shape, got {shapes}: resize or crop first")
    if any(not t.is_floating_point() for t in tensors):
        raise ValueError(
            f"{name} needs float tensors, got {[t.dtype for t in tensors]}: normalize first"
        )


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error."""
    _check_images("l1", pred, target)
    return F.l1_loss(pred, target)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error."""
    _check_images("mse", pred, target)
    return F.mse_loss(pred, target)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation (Rudin 1992): mean |dx| + mean |dy| of neighbour differences.

    Averaged, so it does not grow with the image size.
    """
    _check_images("total_variation", x)
    if min(x.shape[-2:]) < 2:
        raise ValueError(f"total_variation needs images of at least 2x2, got {tuple(x.shape)}")
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dx + dy


# --- SSIM and MS-SSIM -------------------------------------------------------------------------

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
#: Wang, Simoncelli & Bovik 2003, finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(channels: int, like: Tensor) -> Tensor:
    r = SSIM_WINDOW // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * SSIM_SIGMA**2))
    g = (g / g.sum()).to(device=like.device, dtype=like.dtype)
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def _ssim_maps(x: Tensor, y: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Per-(N, C) mean SSIM and mean contrast-structure term, valid (unpadded) Gaussian window."""
    c = x.shape[1]
    window = _gaussian_window(c, x)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=c)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs).mean(dim=(-2, -1)), cs.mean(dim=(-2, -1))


def _check_range(data_range: float) -> None:
    if not data_range > 0:
        raise ValueError(f"data_range {data_range} must be > 0: the span of the normalized data")


def ssim_loss(pred: Tensor, target: Tensor, *, data_range: float = 1.0) -> Tensor:
    """1 - SSIM (Wang 2004), Gaussian window 11, sigma 1.5, mean over valid pixels and channels.

    Equals 1 - skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False); images need at least 11x11 pixels.
    """
    _check_images("ssim_loss", pred, target)
    _check_range(data_range)
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim_loss needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got "
            f"{tuple(pred.shape[-2:])}: use larger training patches"
        )
    ssim, _ = _ssim_maps(pred, target, data_range)
    return 1.0 - ssim.mean()


def ms_ssim_levels(height: int, width: int, max_levels: int = len(MS_SSIM_WEIGHTS)) -> int:
    """Scales MS-SSIM uses on (height, width): the most (<= max_levels) whose coarsest side >= 11.

    Scale k (0-based) sees the image halved k times, so M scales need min(height, width) >=
    11 * 2**(M - 1): 176 px for all five, 88 for four, 44 for three, 22 for two, 11 for one.
    """
    side = min(height, width)
    if side < SSIM_WINDOW:
        raise ValueError(
            f"ms_ssim_loss needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got "
            f"{height}x{width}: use larger training patches"
        )
    return max(1, min(max_levels, 1 + math.floor(math.log2(side / SSIM_WINDOW))))


def ms_ssim_loss(
    pred: Tensor,
    target: Tensor,
    *,
    data_range: float = 1.0,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
) -> Tensor:
    """1 - MS-SSIM (Wang 2003): contrast-structure at each scale, luminance at the coarsest.

    Scales are 2x2 average-pooled. Inputs too small for ``len(weights)`` scales use fewer (rule:
    :func:`ms_ssim_levels`) with the first M weights renormalized to sum to 1. Terms are clamped
    at 1e-6 before the fractional powers so negative correlations give a finite gradient.
    """
    _check_images("ms_ssim_loss", pred, target)
    _check_range(data_range)
    w = [float(v) for v in weights]
    if not w or any(not (v >= 0 and math.isfinite(v)) for v in w) or sum(w) <= 0:
        raise ValueError(f"MS-SSIM weights {w} must be non-empty, finite, >= 0, not all zero")
    levels = ms_ssim_levels(pred.shape[-2], pred.shape[-1], len(w))
    scale_weights = torch.tensor(w[:levels], dtype=pred.dtype, device=pred.device)
    scale_weights = scale_weights / scale_weights.sum()
    x, y = pred, target
    result = None
    for k in range(levels):
        ssim, cs = _ssim_maps(x, y, data_range)
        term = ssim if k == levels - 1 else cs
        factor = term.clamp_min(1e-6) ** scale_weights[k]
        result = factor if result is None else result * factor
        if k < levels - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    assert result is not None
    return 1.0 - result.mean()


# --- VGG-19 features: perceptual and style losses ---------------------------------------------

#: VGG-19 ("E") feature configuration (Simonyan & Zisserman 2015); "M" is a 2x2 max pool.
VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


def _vgg19_layer_names() -> list[str]:
    names: list[str] = []
    block, conv = 1, 1
    for v in VGG19_CONFIG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


#: Layer names in torchvision's vgg19().features index order: conv1_1 (0), relu1_1 (1), ...
VGG19_LAYERS: tuple[str, ...] = tuple(_vgg19_layer_names())
DEFAULT_VGG_LAYERS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG_MISSING_MESSAGE = (
    "perceptual and style losses need VGG-19 weights: download torchvision's vgg19 ImageNet "
    "weights (vgg19-dcbb9e9d.pth) and pass --vgg PATH / set losses.vgg_weights in the config"
)


class VGGFeatures(nn.Module):
    """Frozen VGG-19 conv stack (Simonyan 2015) returning activations at named layers.

    Layers are named conv{b}_{i} (before activation, as ESRGAN uses), relu{b}_{i} or pool{b},
    built only up to the deepest one asked for. Input (N, 1 or 3, H, W) in ``input_range`` is
    mapped to [0, 1], grayscale repeated to 3 channels, then ImageNet-normalized. The
    constructor gives random weights (tests only): use :meth:`from_file` for real training.
    """

    def __init__(
        self,
        layers: Iterable[str] = DEFAULT_VGG_LAYERS,
        *,
        input_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        unknown = [name for name in self.layers if name not in VGG19_LAYERS]
        if not self.layers or unknown:
            raise ValueError(
                f"unknown VGG-19 layers {unknown or '(none given)'}: choose from {VGG19_LAYERS}"
            )
        lo, hi = input_range
        if not hi > lo:
            raise ValueError(f"input_range {input_range} must be (low, high) with high > low")
        self.input_range = (float(lo), float(hi))
        depth = max(VGG19_LAYERS.index(name) for name in self.layers) + 1
        modules: list[nn.Module] = []
        cin = 3
        for v in VGG19_CONFIG:
            if len(modules) >= depth:
                break
            if v == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                cin = int(v)
        self.features = nn.Sequential(*modules[:depth])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(
        cls,
        path: Path | str | None,
        layers: Iterable[str] = DEFAULT_VGG_LAYERS,
        *,
        input_range: tuple[float, float] = (0.0, 1.0),
    ) -> VGGFeatures:
        """Load torchvision's vgg19 ``features`` weights from a .pth or .safetensors state dict.

        Keys as in ``torchvision.models.vgg19().features.state_dict()`` ("0.weight", "0.bias",
        "2.weight", ... "34.bias"), or with a "features." prefix (the whole vgg19 state dict,
        e.g. vgg19-dcbb9e9d.pth, whose "classifier." keys are ignored). Never unpickles objects.
        """
        if path is None:
            raise FileNotFoundError(VGG_MISSING_MESSAGE)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{VGG_MISSING_MESSAGE} (no file at {path})")
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise ImportError(
                    f"{path} is a .safetensors file: pip install safetensors, or convert it to .pth"
                ) from exc
            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(
                    f"{path} is not a plain tensor state dict ({exc}): save "
                    "vgg19().features.state_dict() with torch.save"
                ) from exc
        model = cls(layers, input_range=input_range)
        model.load_features(state, source=str(path))
        return model

    def load_features(self, state: Mapping[str, Tensor], *, source: str = "state dict") -> None:
        """Copy conv weights from a torchvision-layout state dict; deeper VGG-19 keys ignored."""
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{source} must be a mapping of names to tensors, got {type(state)}")
        if any(k.startswith("features.") for k in state):
            state = {
                k.removeprefix("features."): v
                for k, v in state.items()
                if not k.startswith("classifier.")
            }
        full = {
            f"{i}.{p}"
            for i, name in enumerate(VGG19_LAYERS)
            if name.startswith("conv")
            for p in ("weight", "bias")
        }
        own = self.features.state_dict()
        unknown = sorted(set(state) - full)
        missing = sorted(set(own) - set(state))
        wrong = [
            f"{k}: {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if unknown or missing or wrong:
            raise ValueError(
                f"{source} is not a VGG-19 features state dict: unexpected keys {unknown}, "
                f"missing keys {missing}, wrong shapes {wrong}; expected keys like "
                f"{sorted(own)[:4]} as in torchvision.models.vgg19().features.state_dict()"
            )
        self.features.load_state_dict({k: state[k].float() for k in own})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Activations {layer name: (N, C_l, H_l, W_l)} for the layers chosen at construction."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"VGGFeatures takes (N, 1 or 3, H, W) images, got {tuple(x.shape)}: "
                "apply it per channel"
            )
        lo, hi = self.input_range
        x = (x - lo) / (hi - lo)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        wanted = set(self.layers)
        out: dict[str, Tensor] = {}
        for name, module in zip(VGG19_LAYERS, self.features, strict=False):
            x = module(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out


def _layer_weights(vgg: VGGFeatures, layer_weights: Mapping[str, float] | None) -> dict[str, float]:
    if layer_weights is None:
        return {name: 1.0 / len(vgg.layers) for name in vgg.layers}
    unknown = [name for name in layer_weights if name not in vgg.layers]
    if unknown:
        raise ValueError(
            f"layer_weights name layers {unknown} this VGGFeatures does not compute "
            f"({vgg.layers}): build it with VGGFeatures.from_file(path, layers=...)"
        )
    return dict(layer_weights)


def perceptual(
    pred: Tensor,
    target: Tensor,
    vgg: VGGFeatures,
    layer_weights: Mapping[str, float] | None = None,
) -> Tensor:
    """Perceptual loss (Johnson 2016): weighted L1 between VGG-19 features of pred and target.

    Uses the layers ``vgg`` was built with (default relu1_2 ... relu5_4, equal weights summing to
    1); for ESRGAN's before-activation features build it with ``layers=("conv5_4",)``. The
    target's features are constants (no gradient).
    """
    _check_images("perceptual", pred, target)
    weights = _layer_weights(vgg, layer_weights)
    feats = vgg(pred)
    with torch.no_grad():
        ref = vgg(target.detach())
    terms = [w * F.l1_loss(feats[name], ref[name]) for name, w in weights.items()]
    return torch.stack(terms).sum()


def _gram(f: Tensor) -> Tensor:
    n, c, h, w = f.shape
    flat = f.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def style(
    pred: Tensor,
    target: Tensor,
    vgg: VGGFeatures,
    layer_weights: Mapping[str, float] | None = None,
) -> Tensor:
    """Style loss (Gatys 2016): MSE between Gram matrices (divided by C*H*W) of VGG-19 features."""
    _check_images("style", pred, target)
    weights = _layer_weights(vgg, layer_weights)
    feats = vgg(pred)
    with torch.no_grad():
        ref = vgg(target.detach())
    terms = [
        w * F.mse_loss(_gram(feats[name].float()), _gram(ref[name].float()))
        for name, w in weights.items()
    ]
    return torch.stack(terms).sum()


# --- adversarial --------------------------------------------------------------------------------

ADVERSARIAL_KINDS = ("lsgan", "bce", "ragan", "wgan")


def _check_kind(kind: str) -> None:
    if kind not in ADVERSARIAL_KINDS:
        raise ValueError(f"unknown adversarial loss {kind!r}: choose one of {ADVERSARIAL_KINDS}")


def _bce(logits: Tensor, label: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def adversarial_g(kind: str, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
    """Generator adversarial loss on discriminator logits; real_logits only for "ragan".

    lsgan (Mao 2017): mean (D(G) - 1)^2. bce: non-saturating, BCE(D(G), 1). wgan (Arjovsky
    2017): -mean D(G). ragan (ESRGAN, Wang 2018): [BCE(D(r) - mean D(G), 0) +
    BCE(D(G) - mean D(r), 1)] / 2.
    """
    _check_kind(kind)
    if kind == "lsgan":
        return ((fake_logits - 1.0) ** 2).mean()
    if kind == "bce":
        return _bce(fake_logits, 1.0)
    if kind == "wgan":
        return -fake_logits.mean()
    if real_logits is None:
        raise ValueError(
            "adversarial kind 'ragan' needs real_logits (the discriminator's logits on real "
            "images) besides fake_logits"
        )
    return 0.5 * (
        _bce(real_logits - fake_logits.mean(), 0.0) + _bce(fake_logits - real_logits.mean(), 1.0)
    )


def adversarial_d(kind: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator adversarial loss; pass fake logits of detached generator outputs.

    lsgan: [mean (D(r) - 1)^2 + mean D(G)^2] / 2. bce: [BCE(D(r), 1) + BCE(D(G), 0)] / 2.
    wgan: mean D(G) - mean D(r) (add gradient_penalty). ragan: [BCE(D(r) - mean D(G), 1) +
    BCE(D(G) - mean D(r), 0)] / 2.
    """
    _check_kind(kind)
    if kind == "lsgan":
        return 0.5 * (((real_logits - 1.0) ** 2).mean() + (fake_logits**2).mean())
    if kind == "bce":
        return 0.5 * (_bce(real_logits, 1.0) + _bce(fake_logits, 0.0))
    if kind == "wgan":
        return fake_logits.mean() - real_logits.mean()
    return 0.5 * (
        _bce(real_logits - fake_logits.mean(), 1.0) + _bce(fake_logits - real_logits.mean(), 0.0)
    )


def gradient_penalty(
    discriminator: Callable[..., Tensor],
    real: Tensor,
    fake: Tensor,
    *condition: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP (Gulrajani 2017): mean (||grad D(x_hat)||_2 - 1)^2 at random real/fake mixes.

    ``condition`` tensors go to the discriminator unchanged after x_hat (conditional critics);
    outputs of any shape are summed per sample. Multiply by lambda (10 in the paper) yourself.
    """
    if real.shape != fake.shape:
        raise ValueError(
            f"gradient_penalty needs real and fake of one shape, got {tuple(real.shape)} and "
            f"{tuple(fake.shape)}"
        )
    alpha_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(alpha_shape, generator=generator, dtype=real.dtype)
    alpha = alpha.to(real.device)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = discriminator(mixed, *condition)
    (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    norm = grad.reshape(grad.shape[0], -1).norm(2, dim=1)
    return ((norm - 1.0) ** 2).mean()


# --- temporal consistency -----------------------------------------------------------------------


def temporal_warp_loss(
    pred_t: Tensor,
    pred_prev: Tensor,
    frame_t: Tensor,
    frame_prev: Tensor,
    flow_net: Callable[[Tensor, Tensor], Tensor],
    *,
    detach_flow: bool = True,
) -> Tensor:
    """Temporal consistency (tGAN): L1 of pred_t vs pred_prev warped by the inputs' motion.

    ``flow_net(frame_t, frame_prev)`` gives the backward flow at input resolution (see
    engines.models.flow: warp(frame_prev, flow) ~ frame_t); for super-resolved predictions it is
    bilinearly upsampled by the integer scale s and multiplied by s. Pixels whose warp leaves the
    image are masked out. The flow is detached by default so this loss never trains flow_net.
    """
    _check_images("temporal_warp_loss (predictions)", pred_t, pred_prev)
    _check_images("temporal_warp_loss (input frames)", frame_t, frame_prev)
    if pred_t.shape[0] != frame_t.shape[0]:
        raise ValueError(
            f"predictions {tuple(pred_t.shape)} and frames {tuple(frame_t.shape)} differ in batch"
        )
    (h, w), (ph, pw) = frame_t.shape[-2:], pred_t.shape[-2:]
    if ph % h or pw % w or ph // h != pw // w:
        raise ValueError(
            f"prediction size {ph}x{pw} is not one integer scale of the input size {h}x{w}"
        )
    scale = ph // h
    flow = flow_net(frame_t, frame_prev)
    if detach_flow:
        flow = flow.detach()
    if scale != 1:
        flow = scale * F.interpolate(flow, size=(ph, pw), mode="bilinear", align_corners=False)
    warped = warp(pred_prev, flow)
    mask = warp_valid_mask(flow)
    denom = (mask.sum() * pred_t.shape[1]).clamp_min(1.0)
    return (mask * (pred_t - warped).abs()).sum() / denom


@dataclass(frozen=True)
class NoiseModel:
    """A camera's Poisson-Gaussian noise in a run's normalized units: the variance of a pixel
    whose expected value is ``v`` is ``slope * v + intercept``, at least ``floor``."""

    slope: float
    intercept: float
    floor: float

    @classmethod
    def of(cls, gain: float, offset_adu: float, read_noise_e: float, norm_offset: float,
           norm_scale: float) -> NoiseModel:  # fmt: skip
        """From the camera (ADU per electron, offset ADU, read noise electrons) and the run's
        ADU normalization ``v = (adu - norm_offset) / norm_scale``: ADU variance is
        ``gain * (adu - offset) + (gain * read_noise)^2`` (shot and read noise); the floor is a
        quarter electron's or the read noise's variance, whichever is larger, so that pixels with
        no light do not take unbounded weight."""
        s2 = norm_scale * norm_scale
        return cls(
            slope=gain / norm_scale,
            intercept=(gain * (norm_offset - offset_adu) + (gain * read_noise_e) ** 2) / s2,
            floor=gain * gain * max(read_noise_e**2, 0.25) / s2,
        )


def poisson_gaussian(pred: Tensor, target: Tensor, noise: NoiseModel) -> Tensor:
    """Squared error weighted by the inverse of the camera's noise variance at the prediction
    (taken without a gradient; weights scaled to mean 1 over the batch): the Gaussian
    approximation of the Poisson-Gaussian likelihood with the variance held at the current
    estimate. Each pixel's optimum is still the target's expectation; bright pixels, whose
    noise is larger, weigh less, as errors are judged against the noise (what a
    variance-stabilising transform does)."""
    _check_images("poisson_gaussian", pred, target)
    with torch.no_grad():
        var = (noise.slope * pred + noise.intercept).clamp_min(noise.floor)
        weight = 1.0 / var
        weight = weight / weight.mean()
    return (weight * (pred - target) ** 2).mean()


# --- the loss table: every generator term a run may weight --------------------------------------


@dataclass(frozen=True)
class TermInputs:
    """What a term may use beyond pred and target: the run's settings and the step's extras."""

    vgg: VGGFeatures | None
    adversarial: str
    data_range: float
    fake_logits: Tensor | None = None
    real_logits: Tensor | None = None
    pred_prev: Tensor | None = None
    frame_t: Tensor | None = None
    frame_prev: Tensor | None = None
    flow_net: Callable[[Tensor, Tensor], Tensor] | None = None
    noise: NoiseModel | None = None


@dataclass(frozen=True)
class LossTerm:
    """One generator loss term: how to compute it (unweighted) and what it is."""

    compute: Callable[[Tensor, Tensor, TermInputs], Tensor]
    description: str
    needs_vgg: bool = False


def _vgg(x: TermInputs) -> VGGFeatures:
    assert x.vgg is not None  # WeightedLoss loads it for the terms that need it
    return x.vgg


def _noise(x: TermInputs) -> NoiseModel:
    if x.noise is None:
        raise ValueError(
            "the poisson_gaussian term has a weight but no noise model was given: pass "
            "WeightedLoss(noise=NoiseModel.of(...)), or set its weight to 0"
        )
    return x.noise


def _adversarial_term(pred: Tensor, target: Tensor, x: TermInputs) -> Tensor:
    if x.fake_logits is None:
        raise ValueError(
            "the adversarial term has a weight but no fake_logits were given: pass the "
            "discriminator's logits on pred, or set its weight to 0"
        )
    return adversarial_g(x.adversarial, x.fake_logits, x.real_logits)


def _temporal_term(pred: Tensor, target: Tensor, x: TermInputs) -> Tensor:
    inputs = {
        "pred_prev": x.pred_prev, "frame_t": x.frame_t, "frame_prev": x.frame_prev,
        "flow_net": x.flow_net,
    }  # fmt: skip
    missing = [k for k, v in inputs.items() if v is None]
    if missing:
        raise ValueError(
            f"the temporal term has a weight but {missing} were not given: pass them, or set "
            "its weight to 0"
        )
    assert x.pred_prev is not None and x.frame_t is not None and x.frame_prev is not None
    assert x.flow_net is not None
    return temporal_warp_loss(pred, x.pred_prev, x.frame_t, x.frame_prev, x.flow_net)


#: Every generator loss term, by the name a config weights it under. The config's check, the
#: error messages and WeightedLoss all read this table: a new term is one row.
LOSSES: dict[str, LossTerm] = {
    "l1": LossTerm(lambda p, t, x: l1(p, t), "mean absolute error"),
    "mse": LossTerm(lambda p, t, x: mse(p, t), "mean squared error"),
    "ssim": LossTerm(
        lambda p, t, x: ssim_loss(p, t, data_range=x.data_range),
        "1 - SSIM (11 px Gaussian window)",
    ),
    "ms_ssim": LossTerm(
        lambda p, t, x: ms_ssim_loss(p, t, data_range=x.data_range),
        "1 - multi-scale SSIM (as many scales as the crop allows)",
    ),
    "poisson_gaussian": LossTerm(
        lambda p, t, x: poisson_gaussian(p, t, _noise(x)),
        "squared error over the camera's Poisson-Gaussian noise variance at the prediction "
        "(needs the run's camera: data.profile, or the preset's)",
    ),
    "tv": LossTerm(lambda p, t, x: total_variation(p), "total variation of the prediction"),
    "perceptual": LossTerm(
        lambda p, t, x: perceptual(p, t, _vgg(x)),
        "L1 between VGG-19 features (Johnson 2016; needs VGG weights)",
        needs_vgg=True,
    ),
    "style": LossTerm(
        lambda p, t, x: style(p, t, _vgg(x)),
        "MSE between Gram matrices of VGG-19 features (Gatys 2016; needs VGG weights)",
        needs_vgg=True,
    ),
    "adversarial": LossTerm(
        _adversarial_term,
        "the generator's GAN loss on the discriminator's logits (needs fake_logits; "
        "real_logits for ragan)",
    ),
    "temporal": LossTerm(
        _temporal_term,
        "L1 between the prediction and the previous one warped by the flow net "
        "(needs pred_prev, frame_t, frame_prev, flow_net)",
    ),
}
KNOWN_TERMS = tuple(LOSSES)


def describe_losses() -> str:
    """One line per term: name and what it is (for help texts and docs)."""
    return "\n".join(f"{name}: {term.description}" for name, term in LOSSES.items())


class WeightedLoss:
    """The generator's weighted loss sum, configured per run, e.g. {"l1": 1.0, "ssim": 0.2}.

    Terms: the rows of ``LOSSES`` (``describe_losses()`` lists them). Zero-weight terms are
    never computed.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        vgg: VGGFeatures | Path | str | None = None,
        adversarial: str = "lsgan",
        data_range: float = 1.0,
        noise: NoiseModel | None = None,
    ) -> None:
        unknown = [name for name in weights if name not in KNOWN_TERMS]
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}: known terms are {KNOWN_TERMS}")
        bad = {k: v for k, v in weights.items() if not (math.isfinite(float(v)) and v >= 0)}
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
        self.weights = {k: float(v) for k, v in weights.items() if float(v) > 0}
        if not self.weights:
            raise ValueError(f"all loss weights are 0 in {dict(weights)}: give one term a weight")
        _check_kind(adversarial)
        _check_range(data_range)
        self.adversarial = adversarial
        self.data_range = data_range
        self.noise = noise
        self.vgg: VGGFeatures | None = None
        if any(LOSSES[name].needs_vgg for name in self.weights):
            self.vgg = vgg if isinstance(vgg, VGGFeatures) else VGGFeatures.from_file(vgg)

    @property
    def terms(self) -> tuple[str, ...]:
        """The terms this loss computes (those with a weight > 0)."""
        return tuple(self.weights)

    def to(self, device: torch.device | str) -> WeightedLoss:
        """Move the VGG features (if any) to ``device``."""
        if self.vgg is not None:
            self.vgg.to(device)
        return self

    def __call__(
        self,
        pred: Tensor,
        target: Tensor,
        *,
        fake_logits: Tensor | None = None,
        real_logits: Tensor | None = None,
        pred_prev: Tensor | None = None,
        frame_t: Tensor | None = None,
        frame_prev: Tensor | None = None,
        flow_net: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """(weighted total, {term: unweighted value, ..., "total": total}) for logging."""
        _check_images("WeightedLoss", pred, target)
        extras = TermInputs(
            vgg=self.vgg, adversarial=self.adversarial, data_range=self.data_range,
            fake_logits=fake_logits, real_logits=real_logits, pred_prev=pred_prev,
            frame_t=frame_t, frame_prev=frame_prev, flow_net=flow_net, noise=self.noise,
        )  # fmt: skip
        values = {name: LOSSES[name].compute(pred, target, extras) for name in self.weights}
        total = sum(self.weights[name] * value for name, value in values.items())
        assert isinstance(total, Tensor)
        logged = {name: float(value.detach()) for name, value in values.items()}
        logged["total"] = float(total.detach())
        return total, logged
