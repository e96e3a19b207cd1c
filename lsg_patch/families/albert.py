"""ALBERT: the BERT-family hooks, with globals and block padding at embedding_size.

ALBERT's encoder (AlbertTransformer) starts with `embedding_hidden_mapping_in`, so the BERT-family encoder
pre-hook prepends the global rows (LayerNorm and dropout of the embeddings) and appends zero padding at
embedding_size, before that mapping: padded rows become the mapping's bias (docs/LSG_SPEC.md sections 4, 5).
All layers share the attention module of their layer group, which runs "lsg" for every layer of the group.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..hooks import LSGHook
from ..registry_paths import get_submodule
from .bert import BertFamily

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


class MaskAsKeyword(LSGHook):
    """Encoder pre-hook: AlbertModel passes the attention mask by position; the BERT-family hook reads it
    (and replaces it) as the `attention_mask` keyword."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if len(args) < 2:
            return None
        return args[:1] + args[2:], {**kwargs, "attention_mask": args[1]}


class AlbertFamily(BertFamily):
    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        MaskAsKeyword().register_pre(get_submodule(base_model, entry.encoder))  # runs before the BERT-family hooks
        super().install_hooks(base_model, entry, lsg, max_length)
