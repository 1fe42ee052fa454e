"""Training losses, the flow net, and augmentation (engines.train, engines.models.flow)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch: pip install scopecast[train]")

import torch.nn.functional as F  # noqa: E402
from skimage import data as skdata  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

from engines.models.flow import (  # noqa: E402
    FlowNet,
    flow_self_supervised_loss,
    warp,
    warp_valid_mask,
)
from engines.train import augment, losses  # noqa: E402
from engines.train.losses import (  # noqa: E402
    VGGFeatures,
    WeightedLoss,
    adversarial_d,
    adversarial_g,
    gradient_penalty,
    l1,
    ms_ssim_levels,
    ms_ssim_loss,
    mse,
    perceptual,
    ssim_loss,
    style,
    temporal_warp_loss,
    total_variation,
)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with circular padding (textures that tile)."""
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="circular"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="circular"), k.view(1, 1, -1, 1))


def texture(n: int, size: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    tex = blur(torch.rand(n, 1, size, size, generator=generator), sigma)
    lo = tex.amin(dim=(1, 2, 3), keepdim=True)
    hi = tex.amax(dim=(1, 2, 3), keepdim=True)
    return (tex - lo) / (hi - lo)


def camera(size: int = 192) -> torch.Tensor:
    img = skdata.camera()[100 : 100 + size, 150 : 150 + size].astype(np.float32) / 255.0
    return torch.from_numpy(img)[None, None]


# --- pixel losses ---------------------------------------------------------------------------


def test_l1_mse_tv_known_values() -> None:
    a = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    b = torch.zeros_like(a)
    assert l1(a, b).item() == pytest.approx(1.5)
    assert mse(a, b).item() == pytest.approx(3.5)
    # horizontal |1-0|, |3-2| -> mean 1; vertical |2-0|, |3-1| -> mean 2
    assert total_variation(a).item() == pytest.approx(3.0)
    assert total_variation(torch.ones(2, 1, 5, 5)).item() == 0.0
    with pytest.raises(ValueError, match="one shape"):
        l1(a, torch.zeros(1, 1, 3, 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_skimage(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = rng.random((48, 40)).astype(np.float32)
    pred = np.clip(target + rng.normal(0, 0.2, target.shape), 0, 1).astype(np.float32)
    expected = structural_similarity(
        pred, target, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )
    got = ssim_loss(torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None])
    assert got.item() == pytest.approx(1 - expected, abs=1e-3)
    # and on a real image with data_range != 1
    cam = camera(64).numpy()[0, 0] * 4.0
    noisy = cam + rng.normal(0, 0.3, cam.shape).astype(np.float32)
    expected = structural_similarity(
        noisy, cam, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=4.0
    )
    got = ssim_loss(
        torch.from_numpy(noisy)[None, None], torch.from_numpy(cam)[None, None], data_range=4.0
    )
    assert got.item() == pytest.approx(1 - expected, abs=1e-3)


def test_ssim_identical_is_zero_and_gradients_flow() -> None:
    x = torch.rand(2, 1, 32, 32)
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    assert ms_ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    pred = torch.rand(2, 1, 32, 32, requires_grad=True)
    (ssim_loss(pred, x) + ms_ssim_loss(pred, x)).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_ms_ssim_decreases_with_less_blur() -> None:
    sharp = camera(192)
    values = [ms_ssim_loss(blur(sharp, s), sharp).item() for s in (4.0, 2.0, 1.0, 0.5)]
    assert all(a > b for a, b in pairwise(values)), values
    assert values[-1] > 0


def test_ms_ssim_luminance_only_at_the_coarsest_scale() -> None:
    target = camera(64) * 0.8
    brighter = target + 0.1  # same contrast and structure, other mean
    # all weight on the finest scale (contrast-structure only): blind to the offset
    assert ms_ssim_loss(brighter, target, weights=(1.0, 0.0)).item() == pytest.approx(0, abs=1e-5)
    assert ms_ssim_loss(brighter, target, weights=(0.0, 1.0)).item() > 1e-3
    assert ssim_loss(brighter, target).item() > 1e-3


def test_ms_ssim_scales_follow_the_documented_rule() -> None:
    assert [ms_ssim_levels(s, s) for s in (11, 21, 22, 44, 87, 88, 176, 512)] == [
        1, 1, 2, 3, 3, 4, 5, 5,
    ]  # fmt: skip
    assert ms_ssim_levels(200, 30) == 2  # the shorter side decides
    x = torch.rand(1, 1, 30, 30)
    assert torch.isfinite(ms_ssim_loss(x, torch.rand(1, 1, 30, 30)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ms_ssim_loss(torch.rand(1, 1, 10, 64), torch.rand(1, 1, 10, 64))


# --- VGG features -----------------------------------------------------------------------------

SMALL = ("relu1_2", "conv2_2", "relu2_2")


def test_vgg_missing_file_says_what_to_do(tmp_path: Path) -> None:
    for path in (None, tmp_path / "nope.pth"):
        with pytest.raises(FileNotFoundError, match=r"vgg19-dcbb9e9d\.pth.*--vgg PATH"):
            VGGFeatures.from_file(path)
    with pytest.raises(FileNotFoundError, match=r"losses\.vgg_weights"):
        WeightedLoss({"l1": 1.0, "perceptual": 0.1})
    WeightedLoss({"l1": 1.0, "perceptual": 0.0})  # weight 0: VGG never needed


def test_vgg_loads_its_own_layout_and_rejects_bad_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = VGGFeatures(SMALL)
    state = source.features.state_dict()
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight", "5.bias", "5.weight",
                             "7.bias", "7.weight"]  # fmt: skip
    plain, prefixed = tmp_path / "vgg.pth", tmp_path / "vgg_prefixed.pth"
    torch.save(state, plain)
    torch.save(source.state_dict(), prefixed)  # "features.0.weight", ...
    x = torch.rand(2, 1, 32, 32)
    expected = source(x)
    for path in (plain, prefixed):
        loaded = VGGFeatures.from_file(path, SMALL)
        got = loaded(x)
        assert list(got) == list(SMALL)
        for name in SMALL:
            torch.testing.assert_close(got[name], expected[name])
    assert tuple(expected["relu2_2"].shape) == (2, 128, 16, 16)
    assert (expected["conv2_2"] < 0).any() and (expected["relu2_2"] >= 0).all()

    bad = dict(state)
    bad["2.weight"] = torch.zeros(64, 32, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"2\.weight: \(64, 32, 3, 3\)"):
        VGGFeatures.from_file(tmp_path / "bad.pth", SMALL)
    torch.save({**state, "99.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"99\.weight"):
        VGGFeatures.from_file(tmp_path / "extra.pth", SMALL)
    torch.save({k: v for k, v in state.items() if k != "5.bias"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"missing keys \['5.bias'\]"):
        VGGFeatures.from_file(tmp_path / "short.pth", SMALL)
    with pytest.raises(ValueError, match="relu9_9"):
        VGGFeatures(("relu9_9",))


def test_perceptual_and_style() -> None:
    torch.manual_seed(0)
    vgg = VGGFeatures(SMALL)
    x = torch.rand(2, 1, 32, 32)
    assert perceptual(x, x, vgg).item() == 0.0
    assert style(x, x, vgg).item() == 0.0
    pred = torch.rand(2, 1, 32, 32, requires_grad=True)
    p, s = perceptual(pred, x, vgg), style(pred, x, vgg)
    assert p.item() > 0 and torch.isfinite(s) and s.item() > 0
    (p + s).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(not q.requires_grad for q in vgg.parameters())
    only_conv = perceptual(pred, x, vgg, {"conv2_2": 1.0})
    assert only_conv.item() > 0
    with pytest.raises(ValueError, match="relu5_4"):
        perceptual(pred, x, vgg, {"relu5_4": 1.0})


# --- adversarial ------------------------------------------------------------------------------


def test_adversarial_values_on_known_logits() -> None:
    fake = torch.tensor([0.0, 2.0])
    real = torch.tensor([1.0, 3.0])
    log2 = float(np.log(2.0))

    def sp(v: float) -> float:  # softplus
        return float(np.log1p(np.exp(v)))

    assert adversarial_g("lsgan", fake).item() == pytest.approx((1 + 1) / 2)
    assert adversarial_d("lsgan", real, fake).item() == pytest.approx(0.5 * ((0 + 4) / 2 + 2))
    assert adversarial_g("bce", fake).item() == pytest.approx((log2 + sp(-2)) / 2)
    assert adversarial_d("bce", real, fake).item() == pytest.approx(
        0.5 * ((sp(-1) + sp(-3)) / 2 + (log2 + sp(2)) / 2)
    )
    assert adversarial_g("wgan", fake).item() == pytest.approx(-1.0)
    assert adversarial_d("wgan", real, fake).item() == pytest.approx(1.0 - 2.0)
    # RaGAN: real - mean(fake) = [0, 2]; fake - mean(real) = [-2, 0]
    g = 0.5 * ((sp(0) + sp(2)) / 2 + (sp(2) + sp(0)) / 2)
    d = 0.5 * ((sp(-0.0) + sp(-2)) / 2 + (sp(-2) + sp(0)) / 2)
    assert adversarial_g("ragan", fake, real).item() == pytest.approx(g)
    assert adversarial_d("ragan", real, fake).item() == pytest.approx(d)
    with pytest.raises(ValueError, match="real_logits"):
        adversarial_g("ragan", fake)
    with pytest.raises(ValueError, match=r"hinge.*lsgan"):
        adversarial_g("hinge", fake)


def test_gradient_penalty_zero_for_unit_lipschitz_critic() -> None:
    torch.manual_seed(0)
    w = torch.randn(1, 1, 8, 8)
    real, fake = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)

    def critic(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return scale * (x * w).flatten(1).sum(1) / w.norm()

    assert gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-10)
    # gradient norm 3 everywhere -> (3 - 1)^2 = 4; the condition reaches the critic
    assert gradient_penalty(critic, real, fake, 3.0).item() == pytest.approx(4.0, rel=1e-5)
    linear = torch.nn.Conv2d(1, 1, 3)
    gp = gradient_penalty(linear, real, fake)
    gp.backward()
    assert gp.item() > 0 and linear.weight.grad is not None  # trains the critic


# --- flow -------------------------------------------------------------------------------------


def test_warp_by_true_flow_recovers_shifted_image() -> None:
    a = texture(1, 40, 1.5, torch.Generator().manual_seed(0))
    dx, dy = 3, -2  # the scene moves by (dx, dy) from a to b
    b = torch.roll(a, shifts=(dy, dx), dims=(2, 3))
    flow = torch.zeros(1, 2, 40, 40)
    flow[:, 0], flow[:, 1] = dx, dy
    recovered = warp(b, flow)
    torch.testing.assert_close(recovered[..., 4:-4, 4:-4], a[..., 4:-4, 4:-4])
    mask = warp_valid_mask(flow)
    assert mask[0, 0, 5, 5] == 1 and mask[0, 0, 0, 5] == 0 and mask[0, 0, 5, -1] == 0
    # sub-pixel: half-way flows land between the two integer shifts
    half = warp(b, flow / 2)[..., 4:-4, 4:-4]
    assert (half - a[..., 4:-4, 4:-4]).abs().mean() < (b - a)[..., 4:-4, 4:-4].abs().mean()


def translating_pairs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tex = texture(n, 80, 3.0, g)
    d = torch.randint(-2, 3, (n, 2), generator=g)
    a = tex[:, :, 8:72, 8:72]
    b = torch.stack(
        [tex[i, :, 8 - d[i, 1] : 72 - d[i, 1], 8 - d[i, 0] : 72 - d[i, 0]] for i in range(n)]
    )
    return a, b


@pytest.fixture
def one_thread():
    """Tiny nets train fastest, and steadiest on a busy machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flow_net_learns_self_supervised(one_thread: None) -> None:
    torch.manual_seed(0)
    net = FlowNet()
    test_a, test_b = translating_pairs(8, torch.Generator().manual_seed(99))
    with torch.no_grad():
        before = flow_self_supervised_loss(net, test_a, test_b, smoothness=0.0).item()
        assert net(test_a, test_b).abs().max() == 0  # starts at the identity warp
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(80):
        a, b = translating_pairs(2, g)
        loss = flow_self_supervised_loss(net, a, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = flow_self_supervised_loss(net, test_a, test_b, smoothness=0.0).item()
    assert after < 0.7 * before, (before, after)
    odd = net(torch.rand(1, 1, 37, 50), torch.rand(1, 1, 37, 50))
    assert tuple(odd.shape) == (1, 2, 37, 50)


def constant_flow(dx: float, dy: float):
    def flow_net(frame_t: torch.Tensor, frame_prev: torch.Tensor) -> torch.Tensor:
        flow = torch.zeros(frame_t.shape[0], 2, *frame_t.shape[-2:])
        flow[:, 0], flow[:, 1] = dx, dy
        return flow

    return flow_net


@pytest.mark.parametrize("scale", [1, 2])
def test_temporal_warp_loss(scale: int) -> None:
    g = torch.Generator().manual_seed(3)
    frame_t, frame_prev = torch.rand(2, 1, 24, 24, generator=g), torch.rand(2, 1, 24, 24)
    pred_prev = texture(2, 24 * scale, 2.0, g)
    flow_net = constant_flow(1.5, -0.5)
    hr_flow = torch.zeros(2, 2, 24 * scale, 24 * scale)
    hr_flow[:, 0], hr_flow[:, 1] = 1.5 * scale, -0.5 * scale
    consistent = warp(pred_prev, hr_flow)
    assert temporal_warp_loss(consistent, pred_prev, frame_t, frame_prev, flow_net) < 1e-6
    # the inverse-scaled flow (forgetting x scale) is not consistent at scale 2
    flicker = consistent * 1.2 + 0.05
    bad = temporal_warp_loss(flicker, pred_prev, frame_t, frame_prev, flow_net).item()
    assert bad > 0.05
    out_of_image = constant_flow(1000.0, 0.0)
    assert temporal_warp_loss(flicker, pred_prev, frame_t, frame_prev, out_of_image) == 0
    real = temporal_warp_loss(consistent, pred_prev, frame_t, frame_prev, FlowNet())
    assert torch.isfinite(real)


def test_temporal_warp_loss_scales_flow_values() -> None:
    pred_prev = texture(1, 48, 2.0, torch.Generator().manual_seed(4))
    frames = torch.rand(1, 1, 24, 24)
    flow_lr = constant_flow(2.0, 0.0)
    hr = torch.zeros(1, 2, 48, 48)
    hr[:, 0] = 4.0  # 2 px at input resolution = 4 px at x2
    right = temporal_warp_loss(warp(pred_prev, hr), pred_prev, frames, frames, flow_lr).item()
    hr[:, 0] = 2.0  # what an unscaled flow would predict
    wrong = temporal_warp_loss(warp(pred_prev, hr), pred_prev, frames, frames, flow_lr).item()
    assert right < 1e-6 < wrong
    with pytest.raises(ValueError, match="integer scale"):
        temporal_warp_loss(torch.rand(1, 1, 36, 36), torch.rand(1, 1, 36, 36), frames, frames,
                           flow_lr)  # fmt: skip


# --- weighted sum -----------------------------------------------------------------------------


def test_weighted_loss_sums_and_logs() -> None:
    pred = torch.rand(2, 1, 32, 32, requires_grad=True)
    target = torch.rand(2, 1, 32, 32)
    loss = WeightedLoss({"l1": 1.0, "ssim": 0.2, "tv": 0.0, "adversarial": 0.01})
    assert loss.terms == ("l1", "ssim", "adversarial")
    fake_logits = torch.randn(2, 1, 4, 4)
    total, terms = loss(pred, target, fake_logits=fake_logits)
    adv = adversarial_g("lsgan", fake_logits)
    expected = l1(pred, target) + 0.2 * ssim_loss(pred, target) + 0.01 * adv
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(terms) == {"l1", "ssim", "adversarial", "total"}
    assert all(isinstance(v, float) for v in terms.values())
    total.backward()
    assert pred.grad is not None
    with pytest.raises(ValueError, match="fake_logits"):
        loss(pred, target)
    with pytest.raises(ValueError, match=r"\['l2'\].*'l1', 'mse'"):
        WeightedLoss({"l2": 1.0})
    with pytest.raises(ValueError, match=r"-1\.0"):
        WeightedLoss({"l1": -1.0})
    torch.manual_seed(0)
    vgg = VGGFeatures(SMALL)
    with_vgg = WeightedLoss({"perceptual": 1.0, "style": 1.0, "temporal": 1.0}, vgg=vgg)
    frames = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="flow_net"):
        with_vgg(pred, target, pred_prev=target, frame_t=frames, frame_prev=frames)
    _, terms = with_vgg(
        pred, target, pred_prev=target, frame_t=frames, frame_prev=frames,
        flow_net=constant_flow(0.0, 0.0),
    )  # fmt: skip
    assert terms["temporal"] == pytest.approx(l1(pred, target).item(), rel=1e-5)


def test_one_table_of_loss_terms() -> None:
    """LOSSES is the one list: the config's check and WeightedLoss read it; each term says what
    it is, and one with a weight computes."""
    from engines.train.config import GENERATOR_LOSSES

    assert GENERATOR_LOSSES == losses.KNOWN_TERMS == tuple(losses.LOSSES)
    assert {"l1", "mse", "ssim", "ms_ssim", "tv", "perceptual", "style", "adversarial",
            "temporal", "poisson_gaussian"} == set(losses.LOSSES)  # fmt: skip
    described = losses.describe_losses().splitlines()
    assert [line.split(":")[0] for line in described] == list(losses.LOSSES)
    assert all(len(term.description) > 10 for term in losses.LOSSES.values())
    assert {n for n, t in losses.LOSSES.items() if t.needs_vgg} == {"perceptual", "style"}
    pred, target = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    for name in ("l1", "mse", "ssim", "ms_ssim", "tv"):
        _, terms = WeightedLoss({name: 1.0})(pred, target)
        assert terms[name] == pytest.approx(terms["total"]) and terms[name] >= 0


def test_noise_model_is_the_cameras_variance_in_normalized_units() -> None:
    from calibration.camera import CameraParams, adu_variance, expected_adu

    camera = CameraParams(gain_adu_per_electron=1.5, offset_adu=200.0, read_noise_electrons=1.4)
    offset, scale = 195.0, 90.0  # a run's normalization: v = (adu - offset) / scale
    noise = losses.NoiseModel.of(1.5, 200.0, 1.4, offset, scale)
    photons = np.array([0.0, 3.0, 30.0, 300.0], np.float32)
    v = (expected_adu(photons, camera) - offset) / scale
    want = (adu_variance(photons, camera) - 1 / 12) / scale**2  # no quantization in the model
    np.testing.assert_allclose(noise.slope * v + noise.intercept, want, rtol=1e-4)
    assert noise.floor == pytest.approx(1.5**2 * 1.4**2 / scale**2)


def test_poisson_gaussian_weighs_an_error_against_the_noise_where_it_is() -> None:
    noise = losses.NoiseModel(slope=1.0, intercept=0.01, floor=0.01)
    target = torch.tensor([[[[0.0, 1.0]]]])  # a dark and a bright pixel (variance 0.01 and 1.01)
    dark = losses.poisson_gaussian(target + torch.tensor([[[[0.1, 0.0]]]]), target, noise)
    bright = losses.poisson_gaussian(target + torch.tensor([[[[0.0, 0.1]]]]), target, noise)
    assert float(dark) > 20 * float(bright)  # the same error counts far more where noise is low
    assert float(losses.poisson_gaussian(target, target, noise)) == 0.0
    pred = torch.full((1, 1, 4, 4), 0.5, requires_grad=True)
    losses.poisson_gaussian(pred, torch.zeros(1, 1, 4, 4), noise).backward()
    assert pred.grad is not None and (pred.grad > 0).all()  # the weight itself takes no gradient
    with pytest.raises(ValueError, match="no noise model was given"):
        WeightedLoss({"poisson_gaussian": 1.0})(pred, pred)
    total, _ = WeightedLoss({"poisson_gaussian": 1.0}, noise=noise)(target, target)
    assert float(total) == 0.0


# --- augmentation -----------------------------------------------------------------------------


def test_diff_augment_same_params_same_transform() -> None:
    x = torch.rand(4, 1, 32, 32)
    params = augment.sample_params(x.shape, generator=torch.Generator().manual_seed(0))
    real, fake = x.clone(), x.clone()
    torch.testing.assert_close(augment.apply(real, params), augment.apply(fake, params))
    torch.testing.assert_close(
        augment.diff_augment(real, params=params), augment.diff_augment(fake, params=params)
    )
    torch.testing.assert_close(augment.diff_augment(x, seed=5), augment.diff_augment(x, seed=5))
    assert not torch.equal(augment.diff_augment(x, seed=5), augment.diff_augment(x, seed=6))
    assert not torch.equal(augment.apply(x, params), x)
    # the same draw applies to a discriminator input with other channels (e.g. input + output)
    two = torch.cat((x, x), dim=1)
    torch.testing.assert_close(augment.apply(two, params)[:, 1:], augment.apply(x, params))
    with pytest.raises(ValueError, match="sample_params"):
        augment.apply(torch.rand(4, 1, 16, 16), params)
    with pytest.raises(ValueError, match=r"unknown DiffAugment operations.*'color'"):
        augment.diff_augment(x, "color")
    with pytest.raises(ValueError, match="either params or seed"):
        augment.diff_augment(x, params=params, seed=1)


def test_diff_augment_is_differentiable() -> None:
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    out = augment.diff_augment(x, seed=0)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # translation alone moves pixels; the gradient routes each output pixel to its source
    x.grad = None
    params = augment.sample_params(x.shape, "translation", torch.Generator().manual_seed(1))
    (augment.apply(x, params) * torch.arange(256.0).view(1, 1, 16, 16)).sum().backward()
    assert x.grad is not None and set(x.grad.unique().tolist()) <= set(range(256))


def test_diff_augment_ranges_as_documented() -> None:
    n = 2000
    x = torch.rand(n, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    b = augment.sample_params(x.shape, "brightness", g)
    offsets = (augment.apply(x, b) - x).mean(dim=(1, 2, 3))
    lo, hi = augment.BRIGHTNESS_RANGE
    assert offsets.min() >= lo - 1e-6 and offsets.max() < hi + 1e-6
    assert offsets.min() < lo + 0.05 and offsets.max() > hi - 0.05
    c = augment.sample_params(x.shape, "contrast", g)
    out = augment.apply(x, c)
    factors = out.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    lo, hi = augment.CONTRAST_RANGE
    assert factors.min() >= lo - 1e-4 and factors.max() < hi + 1e-4
    assert factors.min() < lo + 0.05 and factors.max() > hi - 0.05
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)))
    t = augment.sample_params((n, 1, 32, 32), "translation", g).translation
    assert t is not None and t.abs().max() == 4  # 0.125 * 32
    cut = augment.sample_params((n, 1, 32, 32), "cutout", g)
    zeros = (augment.apply(torch.ones(n, 1, 32, 32), cut) == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 16 * 16 and zeros.min() > 0


@pytest.mark.parametrize("as_numpy", [False, True])
def test_video_augment_consistent_across_resolutions(as_numpy: bool) -> None:
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 1, 12, 20, generator=g)  # non-square: transposes show
    up = frames.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # x2, pixel-aligned
    target, previous, background = up[-1], up[-2], frames[0]
    sample = [frames, target, previous, background]
    if as_numpy:
        sample = [t.numpy() for t in sample]
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(40):
        f, t, p, bg = (torch.as_tensor(v) for v in augment.video_augment(*sample, rng=rng))
        seen.add(tuple(f.shape))
        f_up = f.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        torch.testing.assert_close(t, f_up[-1])
        torch.testing.assert_close(p, f_up[-2])
        torch.testing.assert_close(bg, f[0])
    assert seen == {(3, 1, 12, 20), (3, 1, 20, 12)}
    flipped = augment.dihedral(frames, 1)
    torch.testing.assert_close(flipped, frames.flip(-1))
    torch.testing.assert_close(augment.dihedral(up, 1), up.flip(-1))
    f, t, p, bg = augment.video_augment(frames, target, None, None, np.random.default_rng(1))
    assert p is None and bg is None
    with pytest.raises(ValueError, match="integer"):
        augment.video_augment(frames, torch.rand(1, 30, 50), rng=rng)


def test_dihedral_ops_as_documented() -> None:
    x = torch.rand(2, 5, 7)
    expected = {
        0: x, 1: x.flip(-1), 2: x.flip(-2), 3: x.flip(-1, -2), 4: x.transpose(-1, -2),
        5: x.flip(-1).transpose(-1, -2), 6: x.flip(-2).transpose(-1, -2),
        7: x.flip(-1, -2).transpose(-1, -2),
    }  # fmt: skip
    for op, want in expected.items():
        torch.testing.assert_close(augment.dihedral(x, op), want)
        np.testing.assert_array_equal(augment.dihedral(x.numpy(), op), want.numpy())
    with pytest.raises(ValueError, match=r"0\.\.7"):
        augment.dihedral(x, 8)


def test_module_exports() -> None:
    assert set(losses.__all__) <= set(dir(losses))
