"""ALBERT: the BERT-family hooks, with globals and block padding at embedding_size.

ALBERT's encoder (AlbertTransformer) starts with `embedding_hidden_mapping_in`, so the BERT-family encoder
pre-hook prepends the global rows (LayerNorm and dropout of the embeddings) and appends zero padding at
embedding_size, before that mapping: padded rows become the mapping's bias (LSG_SPEC.md sections 4, 5).
All layers share the modules of their layer group, so one LSG module serves every layer of a group.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..hooks import LSGHook
from ..registry_paths import get_submodule
from .base import LSGSelfAttention
from .bert import BertFamily

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


class LSGAlbertAttention(LSGSelfAttention):
    """Replaces AlbertAttention, which also holds the output projection, its dropout and the LayerNorm."""

    projection_names = ("query", "key", "value", "dense", "LayerNorm")

    def __init__(self, original: nn.Module, layout: Any) -> None:
        super().__init__(original, layout)
        self.attention_dropout = original.attention_dropout
        self.output_dropout = original.output_dropout
        self.head_size = original.attention_head_size
        self.scaling = original.scaling

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        projections = (self.query, self.key, self.value)
        context = self.lsg_context(hidden_states, attention_mask, projections, self.attention_dropout.p)
        return self.LayerNorm(hidden_states + self.output_dropout(self.dense(context))), None


class MaskAsKeyword(LSGHook):
    """Encoder pre-hook: AlbertModel passes the attention mask by position; the BERT-family hook reads it
    (and replaces it) as the `attention_mask` keyword."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if len(args) < 2:
            return None
        return args[:1] + args[2:], {**kwargs, "attention_mask": args[1]}


class AlbertFamily(BertFamily):
    attention_class = LSGAlbertAttention

    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        MaskAsKeyword().register_pre(get_submodule(base_model, entry.encoder))  # runs before the BERT-family hooks
        super().install_hooks(base_model, entry, lsg, max_length)
