"""Generative KD (issue 14): a frozen conditional diffusion model guides a feed-forward image manipulator.

`data` (seeded procedural bars whose orientation is the attribute), `diffusion` (a `diffusers`
`UNet2DModel` with class conditioning and its `DDPMScheduler`, built from a small config or loaded
from a user's local `save_pretrained` directory; classifier-free guidance and ancestral sampling),
`sds` (score distillation: the guidance gradient w(t) (eps_hat - eps) injected through a surrogate
loss, and SDD's Hybrid Quality Score over timesteps with the timestep policies), `models` (the
manipulator f(x) = x + delta(x) and the attribute classifier), `metrics` (edit success, fidelity)
and `task` (the DDPM, classifier and manipulator Tasks on the one Trainer). Recipe: `method: sdd`
(kdforge/methods/sdd.py, configs/methods/sdd.yaml).
"""

from __future__ import annotations

from types import ModuleType

from kdforge.extras import require

__all__ = ["require_diffusers"]


def require_diffusers() -> ModuleType:
    """The `diffusers` module, or one line naming the `generative` extra."""
    return require("diffusers", "generative", "the generative tasks (a conditional diffusion model) need diffusers")
