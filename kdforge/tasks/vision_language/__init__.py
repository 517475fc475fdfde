"""Vision-language (image-text) tasks: procedural captioned images and CLIP towers from `transformers`.

The towers are `transformers.CLIPModel`s built from small configs with random init, so a user's
local CLIP / TinyCLIP weights load through the same code (`from_pretrained(local_dir)`). The
tokenizer is a `tokenizers` WordLevel model over the procedural vocabulary, wrapped as a
`PreTrainedTokenizerFast` and saved beside the model. `transformers` is the optional `vl` extra;
`require_transformers()` fails in one line naming it. Nothing here downloads.

Modules: `data` (seeded image-caption pairs), `tokenizer`, `models` (configs, local loading,
encoding), `metrics` (zero-shot accuracy, retrieval recall), `inherit` (manual weight
inheritance), `l0` (automatic inheritance: hard-concrete masks and their fusion), `task` (the Task
and its training modules; one process only: the in-batch losses do not gather across processes).
"""

from __future__ import annotations

from types import ModuleType

from kdforge.extras import require

__all__ = ["require_transformers"]


def require_transformers() -> ModuleType:
    """The `transformers` module, or one line naming the extra that provides it."""
    return require("transformers", "vl", "vision-language tasks need transformers")
