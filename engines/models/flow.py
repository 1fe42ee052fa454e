"""A small optical-flow estimator trained self-supervised beside a temporal generator (tGAN).

Convention everywhere: ``flow`` is (N, 2, H, W) in pixels, channels (dx, dy), and is a backward
map: ``warp(b, flow)(p) = b(p + flow(p))``. ``FlowNet()(a, b)`` estimates the flow with which
``warp(b, flow)`` reproduces ``a`` (for a scene moving by d from a to b, flow = +d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_flow(image: Tensor, flow: Tensor) -> None:
    if image.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(
            f"warp needs image (N, C, H, W) and flow (N, 2, H, W), got {tuple(image.shape)} and "
            f"{tuple(flow.shape)}: stack (dx, dy) in pixels as the flow's two channels"
        )
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and flow {tuple(flow.shape)} differ in batch or size: "
            "resize the flow to the image (and scale its values by the same factor)"
        )
    if min(flow.shape[-2:]) < 2:
        raise ValueError(f"warp needs images of at least 2x2 pixels, got {tuple(flow.shape[-2:])}")


def _sample_grid(flow: Tensor) -> Tensor:
    """Normalized grid_sample coordinates (align_corners=True) of p + flow(p)."""
    _, _, h, w = flow.shape
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype)
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype)
    x = xs.view(1, 1, w) + flow[:, 0]
    y = ys.view(1, h, 1) + flow[:, 1]
    return torch.stack((2.0 * x / (w - 1) - 1.0, 2.0 * y / (h - 1) - 1.0), dim=-1)


def warp(image: Tensor, flow: Tensor, *, padding_mode: str = "zeros") -> Tensor:
    """Backward-warp ``image`` by ``flow`` (pixels, (dx, dy)): out(p) = image(p + flow(p)).

    Bilinear (grid_sample, align_corners=True: pixel centres at integer coordinates).
    """
    _check_flow(image, flow)
    grid = _sample_grid(flow.to(image.dtype))
    return F.grid_sample(
        image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True
    )


def warp_valid_mask(flow: Tensor) -> Tensor:
    """(N, 1, H, W) mask: 1 where p + flow(p) lies inside the image, 0 where the warp leaves it."""
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (N, 2, H, W), got {tuple(flow.shape)}")
    _, _, h, w = flow.shape
    with torch.no_grad():
        ys = torch.arange(h, device=flow.device, dtype=flow.dtype).view(1, h, 1)
        xs = torch.arange(w, device=flow.device, dtype=flow.dtype).view(1, 1, w)
        x = xs + flow[:, 0]
        y = ys + flow[:, 1]
        inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return inside.unsqueeze(1).to(flow.dtype)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.1))


def cost_volume(feat_a: Tensor, feat_b: Tensor, radius: int) -> Tensor:
    """Cosine similarity of feat_a(p) and feat_b(p + d), |dx|, |dy| <= radius (PWC-Net, Sun 2018).

    Channel (dy + radius) * (2 * radius + 1) + (dx + radius) holds displacement d.
    """
    n, c, h, w = feat_a.shape
    size = 2 * radius + 1
    feat_a, feat_b = F.normalize(feat_a, dim=1), F.normalize(feat_b, dim=1)
    patches = F.unfold(feat_b, size, padding=radius).view(n, c, size * size, h, w)
    return (patches * feat_a.unsqueeze(2)).sum(dim=1)


class FlowNet(nn.Module):
    """Tiny PWC-Net-like coarse-to-fine flow estimator (Sun 2018), trained beside tGAN's generator.

    A shared feature pyramid (strides 2, 4, ... 2**levels) of both frames; from the coarsest
    level up, frame b's features are warped by the upsampled flow, correlated with frame a's
    within ``search_radius`` (cosine cost volume) and a small estimator adds a residual flow.
    The finest estimate (stride 2) is upsampled to full resolution. Each pair is standardized
    jointly (mean and std of both frames), so intensity scale does not matter; zero-initialized
    estimator outputs start at zero flow (the identity warp). Reach: about
    ``search_radius * (2 ** (levels + 1) - 2)`` pixels (42 with the defaults).
    """

    def __init__(
        self, in_channels: int = 1, widths: tuple[int, ...] = (8, 16, 32), search_radius: int = 3
    ) -> None:
        super().__init__()
        if in_channels < 1 or not widths or min(widths) < 1 or search_radius < 1:
            raise ValueError(
                f"FlowNet needs in_channels >= 1, non-empty positive widths and search_radius "
                f">= 1, got {in_channels}, {widths}, {search_radius}"
            )
        self.in_channels = in_channels
        self.widths = tuple(widths)
        self.search_radius = search_radius
        chans = (in_channels, *widths)
        self.pyramid = nn.ModuleList(
            nn.Sequential(_conv(chans[i], chans[i + 1], 2), _conv(chans[i + 1], chans[i + 1]))
            for i in range(len(widths))
        )
        corr = (2 * search_radius + 1) ** 2
        self.estimators = nn.ModuleList()
        for width in widths:
            head = nn.Conv2d(16, 2, 3, padding=1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.estimators.append(nn.Sequential(_conv(corr + width + 2, 32), _conv(32, 16), head))

    @property
    def levels(self) -> int:
        return len(self.widths)

    def forward(self, frame_a: Tensor, frame_b: Tensor) -> Tensor:
        """Flow (N, 2, H, W) in pixels such that warp(frame_b, flow) ~ frame_a."""
        if frame_a.shape != frame_b.shape or frame_a.dim() != 4:
            raise ValueError(
                f"FlowNet needs two frames of one shape (N, C, H, W), got {tuple(frame_a.shape)} "
                f"and {tuple(frame_b.shape)}"
            )
        if frame_a.shape[1] != self.in_channels:
            raise ValueError(
                f"this FlowNet was built for {self.in_channels} channel(s), got frames with "
                f"{frame_a.shape[1]}: build FlowNet(in_channels={frame_a.shape[1]})"
            )
        n, _, h, w = frame_a.shape
        x = torch.cat((frame_a, frame_b), dim=0)
        mean = x.reshape(2, n, -1).mean(dim=(0, 2)).view(1, n, 1, 1, 1)
        std = x.reshape(2, n, -1).std(dim=(0, 2)).view(1, n, 1, 1, 1)
        x = ((x.view(2, n, *x.shape[1:]) - mean) / (std + 1e-6)).view_as(x)
        m = 2**self.levels
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        feats = []
        for level in self.pyramid:
            x = level(x)
            feats.append(x)
        flow: Tensor | None = None
        for feat, estimator in zip(reversed(feats), reversed(self.estimators), strict=True):
            feat_a, feat_b = feat[:n], feat[n:]
            if flow is None:
                flow = feat.new_zeros(n, 2, *feat.shape[-2:])
            else:
                flow = 2.0 * F.interpolate(
                    flow, size=feat.shape[-2:], mode="bilinear", align_corners=False
                )
                feat_b = warp(feat_b, flow, padding_mode="border")
            corr = cost_volume(feat_a, feat_b, self.search_radius)
            flow = flow + estimator(torch.cat((corr, feat_a, flow), dim=1))
        assert flow is not None
        flow = 2.0 * F.interpolate(flow, scale_factor=2.0, mode="bilinear", align_corners=False)
        return flow[..., :h, :w]


def flow_smoothness(flow: Tensor) -> Tensor:
    """First-order smoothness: mean |d flow / dy| + mean |d flow / dx| (pixels per pixel)."""
    dy = (flow[..., 1:, :] - flow[..., :-1, :]).abs().mean()
    dx = (flow[..., :, 1:] - flow[..., :, :-1]).abs().mean()
    return dx + dy


def flow_self_supervised_loss(
    flow_net: nn.Module, frame_a: Tensor, frame_b: Tensor, *, smoothness: float = 0.01
) -> Tensor:
    """Photometric L1 of warp(b, flow(a->b)) vs a + smoothness x first-order smoothness (UnFlow).

    Samples beyond the image take the border value (not zero, not masked), so flowing content
    out of the frame never lowers the loss.
    """
    if smoothness < 0:
        raise ValueError(f"smoothness weight {smoothness} must be >= 0")
    flow = flow_net(frame_a, frame_b)
    photometric = (warp(frame_b, flow, padding_mode="border") - frame_a).abs().mean()
    if smoothness == 0:
        return photometric
    return photometric + smoothness * flow_smoothness(flow)
