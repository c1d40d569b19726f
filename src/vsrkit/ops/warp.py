"""Backward warping by optical flow, the alignment primitive of every model here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _base_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=0)  # (2, H, W), x first like the flow


def flow_warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``x`` at ``p + flow(p)`` with bilinear interpolation.

    ``x`` is (N, C, H, W); ``flow`` is (N, 2, H, W) in pixels, channel 0 = dx, channel 1 = dy.
    The sampling grid is built in fp32 whatever the dtype of ``x``: in bf16 the absolute pixel
    coordinates of a 320-wide frame would be off by up to a pixel.
    """
    n, _, h, w = x.shape
    if flow.shape[-2:] != (h, w):
        raise ValueError(f"flow size {tuple(flow.shape[-2:])} does not match feature size {(h, w)}")
    grid_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    coords = _base_grid(h, w, x.device).to(grid_dtype).unsqueeze(0) + flow.to(grid_dtype)
    # align_corners=True maps pixel centres 0 and W-1 to -1 and 1.
    gx = 2.0 * coords[:, 0] / max(w - 1, 1) - 1.0
    gy = 2.0 * coords[:, 1] / max(h - 1, 1) - 1.0
    grid = torch.stack((gx, gy), dim=3)
    out = F.grid_sample(
        x.to(grid_dtype), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True
    )
    return out.to(x.dtype)
