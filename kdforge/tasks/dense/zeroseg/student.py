"""ZeroSeg's student: a GroupViT vision tower (`transformers`) with ZeroSeg's heads.

The tower is a `transformers.GroupViTVisionModel` built from a small config (random init) whose
stages are: an encoder stage without group tokens (the MAE-style encoder: it sees only the visible
patches when training masks them), then grouping stages (learnable group tokens join the tokens,
a few transformer layers, then GroupViT's token-assign block with Gumbel-softmax hard assignment,
straight-through) that merge the patches into m segment tokens, then a last stage of layers over
the segments. A user's saved `GroupViTVisionModel` directory (`save_pretrained` layout) loads
through the same class (`StudentSpec.local_dir`); nothing downloads. transformers leaves the group
tokens and position embeddings of a fresh model at zero (pretrained weights fill them), so
`build_groupvit` draws them as the original GroupViT does (truncated normal, std 0.02).

`grouping: pooled` replaces the tower's grouping stages by `SegmentHead` (kdforge's
`PooledGrouping` block: a segment is the mean of the tokens hard-assigned to it, with no soft
cross-attention over the whole image and no group-token residual, so it can only describe its own
region). It was built because the GroupViT block lets segment tokens read the whole image softly
and, at the CPU demo's budget, its hard assignment collapsed (one or two segments per image); the
pooled block collapsed as well there, so the recipes keep GroupViT's stages.

Heads (`ZeroSegStudent`): `proj` maps each segment token into the teacher's embedding space
(g_i); the image embedding is z = MLP(mean_i(TransformerLayer(g))) (computed from the projected
segments, so the global loss trains `proj` too); an optional MAE decoder (mask tokens, one
learned position embedding, transformer layers, a linear patch predictor) reconstructs the
masked patches. At inference nothing is masked; a pixel belongs to the segment its patch was
hard-assigned to through the stages (one-hot maps composed, upsampled bilinearly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.vision_language import require_transformers
from kdforge.tasks.vision_language.models import load_local_pretrained

__all__ = ["PooledGrouping", "SegmentHead", "StudentSpec", "ZeroSegStudent", "build_groupvit", "build_student",
           "load_groupvit", "patchify"]


@dataclass
class StudentSpec:
    """The student's sizes (random init), or `local_dir`: a saved GroupViTVisionModel to start from."""

    patch_size: int = 8
    width: int = 64
    heads: int = 4
    mlp: int = 128
    encoder_layers: int = 2            # before the first grouping (the MAE encoder's own layers)
    group_layers: list[int] = field(default_factory=lambda: [2, 2])      # layers of each grouping stage
    group_tokens: list[int] = field(default_factory=lambda: [16, 8])     # group tokens of each grouping stage
    final_layers: int = 1              # layers over the m = group_tokens[-1] segment tokens
    gumbel: bool = True                # GroupViT's Gumbel noise when training (hard assignment always)
    grouping: str = "groupvit"         # groupvit: transformers' stages | pooled: kdforge's block (segment = patches)
    assign_eps: float = 1.0            # GroupViT's: a segment averages its patches as sum / (count + eps)
    group_token_std: float = 1.0       # pooled: init std of the group tokens (GroupViT's 0.02 makes them alike)
    decoder_layers: int = 1            # MAE decoder (built when the reconstruction loss is on)
    decoder_width: int = 64
    local_dir: str | None = None

    def check(self, where: str) -> None:
        if min(self.patch_size, self.width, self.heads, self.mlp, self.decoder_width) < 1 or self.width % self.heads:
            raise ConfigError(f"{where}: patch_size, width, heads, mlp, decoder_width must be >= 1 and width "
                              f"divisible by heads, got {self.patch_size}, {self.width}, {self.heads}, {self.mlp}")
        if len(self.group_layers) != len(self.group_tokens) or not self.group_tokens:
            raise ConfigError(f"{where}: group_layers and group_tokens need one entry per grouping stage, got "
                              f"{self.group_layers} and {self.group_tokens}")
        if self.grouping not in ("pooled", "groupvit"):
            raise ConfigError(f"{where}.grouping must be pooled or groupvit, got {self.grouping!r}")
        if min(self.group_tokens) < 1 or min(self.group_layers) < 0 or self.encoder_layers < 0 \
                or self.final_layers < 0 or self.decoder_layers < 0:
            raise ConfigError(f"{where}: group_tokens must be >= 1 and layer counts >= 0")


def build_groupvit(spec: StudentSpec, image_size: int) -> nn.Module:
    """A randomly initialised GroupViTVisionModel: [encoder stage, grouping stages ..., final stage], or
    only the encoder stage when `spec.grouping` is `pooled` (the grouping is then a `SegmentHead`)."""
    transformers = require_transformers()
    spec.check("model")
    if image_size % spec.patch_size:
        raise ConfigError(f"model.patch_size {spec.patch_size} does not divide the image size {image_size}")
    if spec.grouping == "pooled":
        depths, tokens, outputs = [spec.encoder_layers], [0], [0]
    else:
        depths = [spec.encoder_layers, *spec.group_layers, spec.final_layers]
        tokens, outputs = [0, *spec.group_tokens, 0], [0, *spec.group_tokens, spec.group_tokens[-1]]
    config = transformers.GroupViTVisionConfig(
        hidden_size=spec.width, intermediate_size=spec.mlp, depths=depths, num_hidden_layers=sum(depths),
        num_group_tokens=tokens, num_output_groups=outputs,
        num_attention_heads=spec.heads, image_size=image_size, patch_size=spec.patch_size, num_channels=3,
        assign_eps=spec.assign_eps)
    tower = transformers.GroupViTVisionModel(config)
    # transformers leaves the group tokens and position embeddings at zero (pretrained weights fill them); the
    # original GroupViT draws them from a truncated normal (std 0.02). Zero group tokens are all identical, so
    # the groups start symmetric and one segment takes the whole image.
    with torch.no_grad():
        nn.init.trunc_normal_(tower.vision_model.embeddings.position_embeddings, std=0.02)
        for stage in tower.vision_model.encoder.stages:
            if stage.group_token is not None:
                nn.init.trunc_normal_(stage.group_token, std=0.02)
    return tower


def load_groupvit(local_dir: str | Path) -> nn.Module:
    """A user's saved GroupViTVisionModel (never a hub name: nothing downloads)."""
    return load_local_pretrained(local_dir, "GroupViTVisionModel", "groupvit_vision_model", "a GroupViTVisionModel")


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), patches row-major (the tower's token order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MAEDecoder(nn.Module):
    """Visible tokens + mask tokens at the masked places -> predicted pixels of every patch."""

    def __init__(self, width: int, decoder_width: int, layers: int, heads: int, patches: int, patch_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, patches, decoder_width))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(decoder_width, heads, 2 * decoder_width, 0.0,
                                                                batch_first=True, norm_first=True)
                                     for _ in range(layers)])
        self.norm = nn.LayerNorm(decoder_width)
        self.head = nn.Linear(decoder_width, patch_dim)

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        b, _, _ = tokens.shape
        full = self.mask_token.expand(b, self.pos.shape[1], -1).clone()
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]), self.embed(tokens))
        x = full + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _layer(width: int, heads: int, mlp: int) -> nn.Module:
    return nn.TransformerEncoderLayer(width, heads, mlp, 0.0, activation="gelu", batch_first=True, norm_first=True)


class PooledGrouping(nn.Module):
    """One grouping stage: group tokens join the tokens for `layers` transformer layers, then every token
    is assigned to one group (Gumbel-softmax over the groups, hard, straight-through, as GroupViT) and a
    segment is the mean of its tokens' values, sum / (count + eps), plus an MLP. Unlike GroupViT's block
    the segment holds nothing but its region: no soft cross-attention over the whole image before the
    assignment and no group-token residual, so a segment can only describe the tokens it owns."""

    def __init__(self, width: int, heads: int, mlp: int, layers: int, groups: int, gumbel: bool = True,
                 eps: float = 1.0, token_std: float = 1.0) -> None:
        super().__init__()
        self.group_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, groups, width), std=token_std,
                                                              a=-2 * token_std, b=2 * token_std))
        self.layers = nn.ModuleList([_layer(width, heads, mlp) for _ in range(layers)])
        self.norm_x, self.norm_g, self.norm_out = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))
        self.gumbel, self.eps, self.scale = gumbel, eps, width ** -0.5

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, N, W) -> (segments (B, G, W), soft assignment (B, G, N): softmax over the groups)."""
        from transformers.models.groupvit.modeling_groupvit import gumbel_softmax, hard_softmax

        groups = self.group_token.shape[1]
        h = torch.cat([x, self.group_token.expand(x.shape[0], -1, -1)], 1)
        for layer in self.layers:
            h = layer(h)
        x, g = h[:, :-groups], h[:, -groups:]
        nx = self.norm_x(x)
        logits = (self.q(self.norm_g(g)) @ self.k(nx).transpose(1, 2)) * self.scale      # (B, G, N)
        if self.training and self.gumbel:
            hard = gumbel_softmax(logits, dim=-2, hard=True)
        else:
            hard = hard_softmax(logits, dim=-2)
        weights = hard / (hard.sum(-1, keepdim=True) + self.eps)
        seg = self.out(weights @ self.v(nx))
        seg = seg + self.mlp(self.norm_out(seg))
        return seg, logits.softmax(-2)


class SegmentHead(nn.Module):
    """Grouping stages (e.g. 16 then 8 groups), then `final_layers` transformer layers over the segments."""

    def __init__(self, spec: StudentSpec) -> None:
        super().__init__()
        w = spec.width
        self.stages = nn.ModuleList([PooledGrouping(w, spec.heads, spec.mlp, layers, groups, spec.gumbel,
                                                    spec.assign_eps, spec.group_token_std)
                                     for layers, groups in zip(spec.group_layers, spec.group_tokens)])
        self.final = nn.ModuleList([_layer(w, spec.heads, spec.mlp) for _ in range(spec.final_layers)])
        self.norm = nn.LayerNorm(w)

    @property
    def num_segments(self) -> int:
        return int(self.stages[-1].group_token.shape[1])

    def forward(self, tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
        assignments = []
        h = tokens
        for stage in self.stages:
            h, a = stage(h)
            assignments.append(a)
        for layer in self.final:
            h = layer(h)
        return self.norm(h), assignments


@dataclass
class StudentOutput:
    segments: Tensor                   # (B, m, E) projected segment tokens g (not normalised)
    image: Tensor                      # (B, E) pooled image embedding z (not normalised)
    assignments: list[Tensor]          # per grouping stage: (B, groups, tokens) soft assignment
    tokens: Tensor                     # (B, visible patches, W) encoder output (the MAE decoder's input)


class ZeroSegStudent(nn.Module):
    """GroupViT tower + segment projection + z head (+ MAE decoder when `reconstruct`)."""

    def __init__(self, tower: nn.Module, embed_dim: int, reconstruct: bool = False, gumbel: bool = True,
                 decoder_layers: int = 1, decoder_width: int = 64, head: SegmentHead | None = None) -> None:
        """`head`: kdforge's pooled grouping over the tower's encoder stage (the tower has that stage only);
        None: the tower's own GroupViT grouping stages."""
        super().__init__()
        cfg = tower.config
        if cfg.num_group_tokens[0] != 0 and reconstruct:
            raise ConfigError("zeroseg: the reconstruction loss needs a student whose first stage has no group "
                              "tokens (its output is the patch tokens the MAE decoder reads)")
        if head is None and not any(cfg.num_group_tokens):
            raise ConfigError("zeroseg: the student tower has no grouping stage (num_group_tokens all 0)")
        if head is not None and (len(cfg.depths) != 1 or cfg.num_group_tokens[0]):
            raise ConfigError("zeroseg: a pooled grouping head sits on a tower with one stage and no group tokens")
        self.tower, self.head = tower, head
        if not gumbel:              # hard assignment without Gumbel noise (GroupViT's eval path) in training too
            for stage in tower.vision_model.encoder.stages:
                if stage.downsample is not None:
                    stage.downsample.assign.get_attn = _no_gumbel(stage.downsample.assign.get_attn)
        self.patch = int(cfg.patch_size)
        self.grid = int(cfg.image_size) // self.patch
        width = int(cfg.hidden_size)
        self.proj = nn.Linear(width, embed_dim)
        heads = 4 if embed_dim % 4 == 0 else 1
        self.pool_layer = nn.TransformerEncoderLayer(embed_dim, heads, 2 * embed_dim, 0.0, batch_first=True,
                                                     norm_first=True)
        self.pool_mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.decoder = (MAEDecoder(width, decoder_width, decoder_layers, 4 if decoder_width % 4 == 0 else 1,
                                   self.grid ** 2, self.patch ** 2 * 3) if reconstruct else None)

    @property
    def num_segments(self) -> int:
        return self.head.num_segments if self.head is not None else int(self.tower.config.num_output_groups[-1])

    def forward(self, pixel_values: Tensor, keep: Tensor | None = None) -> StudentOutput:
        """`keep` (B, k): the visible patch positions (None: every patch)."""
        vm = self.tower.vision_model
        h = vm.embeddings(pixel_values)
        if keep is not None:
            h = h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        group = None
        tokens = h
        assignments = []
        for i, stage in enumerate(vm.encoder.stages):
            h, group, attn = stage(h, group, output_attentions=True)
            if i == 0 and not stage.with_group_token:
                tokens = h
            if attn is not None:
                assignments.append(attn)
        if self.head is not None:
            h, assignments = self.head(h)
        else:
            h = vm.layernorm(h)
        g = self.proj(h)
        z = self.pool_mlp(self.pool_layer(g).mean(1))
        return StudentOutput(g, z, assignments, tokens)

    def reconstruct(self, tokens: Tensor, keep: Tensor) -> Tensor:
        if self.decoder is None:
            raise KdforgeError("zeroseg: the student has no MAE decoder (reconstruction is off)")
        return self.decoder(tokens, keep)

    def pixel_groups(self, assignments: list[Tensor], size: int) -> Tensor:
        """(B, m, size, size): which segment owns each pixel, as the forward pass assigned it.

        Each patch goes to its stage-1 group (argmax: the hard assignment the forward pass used), that
        group to its stage-2 group, and so on; the one-hot ownership is upsampled bilinearly (smooth
        borders). GroupViT multiplies the soft maps instead, which only agrees once they are sharp: a
        small model's near-uniform soft maps give one segment the whole image."""
        maps = F.one_hot(assignments[0].argmax(1), assignments[0].shape[1]).float()     # (B, patches, groups_1)
        for a in assignments[1:]:
            maps = maps @ F.one_hot(a.argmax(1), a.shape[1]).float()                    # (B, patches, groups_k)
        b, n, m = maps.shape
        if n != self.grid ** 2:
            raise KdforgeError(f"pixel_groups: the assignments cover {n} patches, the image has {self.grid ** 2}")
        maps = maps.transpose(1, 2).reshape(b, m, self.grid, self.grid)
        return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def _no_gumbel(get_attn: Any) -> Any:
    def wrapped(attn: Tensor, gumbel: bool = True, hard: bool = True) -> Tensor:
        return get_attn(attn, gumbel=False, hard=hard)

    return wrapped


def build_student(spec: StudentSpec, image_size: int, embed_dim: int, reconstruct: bool) -> ZeroSegStudent:
    """The recipe's student: the tower (random init or `spec.local_dir`) + its grouping + ZeroSeg's heads."""
    tower = load_groupvit(spec.local_dir) if spec.local_dir else build_groupvit(spec, image_size)
    if int(tower.config.image_size) != image_size:
        raise KdforgeError(f"model.local_dir {spec.local_dir}: its tower takes {tower.config.image_size} px images, "
                           f"the canvases are {image_size} px")
    if spec.grouping == "pooled" and any(tower.config.num_group_tokens):
        raise ConfigError(f"model.local_dir {spec.local_dir} holds a GroupViT with its own grouping stages: set "
                          "model.grouping=groupvit (pooled grouping sits on a one-stage encoder)")
    head = SegmentHead(spec) if spec.grouping == "pooled" else None
    return ZeroSegStudent(tower, embed_dim, reconstruct=reconstruct, gumbel=spec.gumbel,
                          decoder_layers=spec.decoder_layers, decoder_width=spec.decoder_width, head=head)
