"""RoIAlign (plain torch, grid_sample) against a loop-by-loop bilinear reference written from the definition."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.tasks.detection.roi import roi_align, rois_from_list


def _bilinear(f: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """One RoIAlign sample: 0 beyond one pixel outside the map, else the clamped bilinear value."""
    _, h, w = f.shape
    if y < -1 or y > h or x < -1 or x > w:
        return torch.zeros(f.shape[0], dtype=f.dtype)
    y, x = min(max(y, 0.0), h - 1), min(max(x, 0.0), w - 1)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    return (f[:, y0, x0] * (1 - ly) * (1 - lx) + f[:, y0, x1] * (1 - ly) * lx
            + f[:, y1, x0] * ly * (1 - lx) + f[:, y1, x1] * ly * lx)


def _reference(feat: torch.Tensor, rois: torch.Tensor, oh: int, ow: int, scale: float, s: int) -> torch.Tensor:
    out = torch.zeros(len(rois), feat.shape[1], oh, ow, dtype=feat.dtype)
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (v * scale - 0.5 for v in (x1, y1, x2, y2))
        bw, bh = (x2 - x1) / ow, (y2 - y1) / oh
        for i in range(oh):
            for j in range(ow):
                samples = [_bilinear(feat[int(b)], y1 + (i + (a + 0.5) / s) * bh, x1 + (j + (c + 0.5) / s) * bw)
                           for a in range(s) for c in range(s)]
                out[r, :, i, j] = torch.stack(samples).mean(0)
    return out


def test_roi_align_matches_the_definition_inside_at_the_edges_and_outside() -> None:
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0],        # inside
                         [1, -6.0, -3.0, 10.0, 8.0],       # crosses the top-left edge
                         [0, 35.0, 30.0, 47.0, 40.0],      # runs off the bottom-right
                         [1, 3.3, 4.1, 3.9, 4.4],          # sub-pixel box
                         [0, 60.0, 60.0, 70.0, 70.0]],     # entirely outside: zeros
                        dtype=torch.float64)
    for size, scale, s in [((3, 4), 0.25, 2), ((2, 2), 0.25, 1), ((5, 3), 0.5, 3)]:
        got = roi_align(feat, rois, size, scale, s)
        assert torch.allclose(got, _reference(feat, rois, *size, scale, s), atol=1e-12)
    assert roi_align(feat, rois, 2, 0.25)[4].abs().max() == 0


def test_roi_align_of_a_constant_map_is_constant_and_gradients_reach_the_features() -> None:
    feat = torch.full((1, 2, 8, 8), 3.0, requires_grad=True)
    out = roi_align(feat, torch.tensor([[0, 4.0, 4.0, 20.0, 28.0]]), 7, 0.25, 2)
    assert torch.allclose(out, torch.full_like(out, 3.0))
    out.sum().backward()
    assert feat.grad is not None and feat.grad.sum() > 0


def test_rois_from_list_and_bad_shapes() -> None:
    rois = rois_from_list([torch.tensor([[0.0, 0, 4, 4]]), torch.zeros(0, 4), torch.tensor([[1.0, 1, 2, 2]] * 2)])
    assert rois[:, 0].tolist() == [0, 2, 2] and rois.shape == (3, 5)
    assert roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(0, 5), 2).shape == (0, 1, 2, 2)
    with pytest.raises(KdforgeError, match="rois must be"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(3, 4), 2)
    with pytest.raises(KdforgeError, match="features must be"):
        roi_align(torch.zeros(1, 4, 4), torch.zeros(1, 5), 2)
