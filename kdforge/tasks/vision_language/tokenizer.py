"""The captions' tokenizer: a `tokenizers` WordLevel model wrapped as a transformers fast tokenizer.

Built from the procedural vocabulary (whitespace words, <bos> ... <eos>, <pad> 0) and saved with
`save_pretrained` beside the model, so a saved model directory reloads with `from_pretrained`.
A user's own tokenizer (a local CLIP's BPE) loads from its directory through `AutoTokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.vision_language import require_transformers

__all__ = ["build_tokenizer", "encode", "load_tokenizer"]


def build_tokenizer(vocab: list[str], context_length: int = 16) -> Any:
    """A `PreTrainedTokenizerFast` over `vocab` (which starts with <pad>, <unk>, <bos>, <eos>)."""
    transformers = require_transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    if vocab[:4] != ["<pad>", "<unk>", "<bos>", "<eos>"]:
        raise KdforgeError("tokenizer: the vocabulary must start with <pad>, <unk>, <bos>, <eos>")
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                model_max_length=context_length)


def load_tokenizer(local_dir: str | Path) -> Any:
    """The tokenizer saved in a local model directory (no download: a missing one fails in one line)."""
    transformers = require_transformers()
    path = Path(local_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise KdforgeError(f"{path} holds no tokenizer (tokenizer.json / vocab.json); save one beside the model")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:        # noqa: BLE001 (transformers raises many kinds)
        raise KdforgeError(f"cannot load the tokenizer in {path}: {str(exc).splitlines()[0]}") from None


def encode(tokenizer: Any, texts: list[str], context_length: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (N, context_length), padded and truncated."""
    out = tokenizer(list(texts), padding="max_length", max_length=context_length, truncation=True,
                    return_tensors="pt")
    return out["input_ids"], out["attention_mask"]
