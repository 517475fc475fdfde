"""Point segmentation pieces: the PointNet-lite voxel-context net, super-voxels, cosine k-means, Hungarian mIoU."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.clusters import (
    assign_cosine,
    confusion,
    hungarian_miou,
    kmeans_cosine,
    segment_mean,
    supervoxels,
)
from kdforge.tasks.pointcloud.segmentation import PointSegConfig, PointSegNet


def test_hungarian_miou_hand_worked_case():
    # classes (rows) x clusters: class 0 -> cluster 1 (2 pts); class 1 -> cluster 0 (2); class 2 -> clusters 1, 2
    pred = torch.tensor([1, 1, 0, 0, 1, 2])
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    assert confusion(pred, target, 3, 3).tolist() == [[0, 2, 0], [2, 0, 0], [0, 1, 1]]
    r = hungarian_miou(pred, target, 3, 3)
    assert r["match"] == [1, 0, 2]
    # class 0: tp 2, fp 1 (the class-2 point in cluster 1), fn 0 -> 2/3; class 1: 1; class 2: tp 1, fn 1 -> 1/2
    assert r["ious"] == pytest.approx([200 / 3, 100.0, 50.0])
    assert r["miou"] == pytest.approx((200 / 3 + 100 + 50) / 3)
    assert r["oacc"] == pytest.approx(500 / 6)


def test_hungarian_miou_is_permutation_invariant_and_ignores_negative_targets():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (200,), generator=g)
    pred = torch.where(torch.rand(200, generator=g) < 0.8, target, torch.randint(0, 4, (200,), generator=g))
    perm = torch.tensor([2, 0, 3, 1])
    a, b = hungarian_miou(pred, target, 4, 4), hungarian_miou(perm[pred], target, 4, 4)
    assert a["miou"] == pytest.approx(b["miou"])
    # brute force over all 24 matchings gives the same best total
    best = max(sum(int(((pred == p[c]) & (target == c)).sum()) for c in range(4))
               for p in __import__("itertools").permutations(range(4)))
    assert a["oacc"] == pytest.approx(100 * best / 200)
    t2 = torch.cat([target, torch.full((5,), -1)])
    assert hungarian_miou(torch.cat([pred, torch.zeros(5, dtype=torch.long)]), t2, 4, 4)["miou"] == \
        pytest.approx(a["miou"])
    with pytest.raises(KdforgeError, match="differ"):
        hungarian_miou(pred[:3], target, 4)


def test_more_clusters_than_classes_leaves_unmatched_points_as_misses():
    pred = torch.tensor([0, 0, 1, 2])
    target = torch.tensor([0, 0, 0, 1])
    r = hungarian_miou(pred, target, 2, 3)
    assert r["match"] == [0, 2]
    assert r["ious"] == pytest.approx([200 / 3, 100.0])      # class 0: tp 2, fn 1 (the point in cluster 1)


def test_supervoxels_split_voxels_by_intensity_and_segment_mean():
    pts = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.2, 0.3, 0.4, 0.15], [0.2, 0.3, 0.4, 0.9],   # one voxel, 2 bins
                        [1.5, 0.1, 0.1, 0.1], [9.0, 0.0, 0.0, 0.5]])                        # another voxel; outside
    ids = supervoxels(pts, None, 1.0, 2, (-2.0, -2.0, -2.0), (2.0, 2.0, 2.0))
    assert ids[4] == -1
    assert ids[0] == ids[1] and len({int(ids[0]), int(ids[2]), int(ids[3])}) == 3
    assert sorted(ids[:4].unique().tolist()) == [0, 1, 2]
    vals = torch.arange(10.0).reshape(5, 2)
    m = segment_mean(vals, ids, 3)
    assert m[ids[0]].tolist() == pytest.approx(((vals[0] + vals[1]) / 2).tolist())
    assert m[ids[3]].tolist() == vals[3].tolist()
    with pytest.raises(KdforgeError, match="intensity"):
        supervoxels(pts[:, :3], None, 1.0, 2, (-2.0, -2.0, -2.0), (2.0, 2.0, 2.0))


def test_kmeans_cosine_finds_directions():
    g = torch.Generator().manual_seed(1)
    dirs = torch.eye(3)
    x = torch.cat([d * (1 + torch.rand(30, 1, generator=g)) + 0.05 * torch.randn(30, 3, generator=g) for d in dirs])
    c = kmeans_cosine(x, 3, seed=0)
    assert torch.allclose(c.norm(dim=1), torch.ones(3), atol=1e-5)
    lab = assign_cosine(x, c)
    for i in range(3):            # every true direction is one cluster
        assert len(lab[30 * i:30 * (i + 1)].unique()) == 1
    assert len(lab.unique()) == 3


def test_point_seg_net_shapes_taps_and_context():
    torch.manual_seed(0)
    net = PointSegNet(PointSegConfig(width=8, out=6), extent=8.0, z_range=(-2.0, 2.0))
    pts = torch.rand(50, 4) * torch.tensor([4.0, 4.0, 1.0, 1.0])
    batch = torch.cat([torch.zeros(25), torch.ones(25)]).long()
    out = net(pts, batch)
    assert out["features"].shape == (50, 6) and len(out["taps"]) == 3
    # scenes of a batch do not see each other: scene 0 alone gives the same features
    alone = net(pts[:25])["features"]
    assert torch.allclose(alone, out["features"][:25], atol=1e-5)
    # moving a point of the same voxel changes its neighbours' features (voxel context), another scene's not
    moved = pts.clone()
    moved[0, 2] += 0.3
    out2 = net(moved, batch)["features"]
    assert not torch.allclose(out2[1:25], out["features"][1:25])
    assert torch.allclose(out2[25:], out["features"][25:], atol=1e-6)
    out["features"].sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(KdforgeError, match="points must be"):
        net(pts[:, :3])
    with pytest.raises(KdforgeError, match="pillar_blocks"):
        PointSegNet(PointSegConfig(scales=[1.0], pillar_blocks=[True, False]), 8.0, (-2.0, 2.0))


def test_point_seg_net_points_outside_the_box_still_get_features():
    net = PointSegNet(PointSegConfig(width=8, out=4), extent=2.0, z_range=(-1.0, 1.0))
    pts = torch.tensor([[0.0, 0.0, 0.0, 0.5], [50.0, 0.0, 0.0, 0.5]])
    f = net(pts)["features"]
    assert torch.isfinite(f).all() and not math.isnan(float(f.detach().sum()))
