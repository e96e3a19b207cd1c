"""DistilBERT: the BERT-family hooks on `transformer`, with DistilBERT's attention projections.

Embeddings are word + position, then LayerNorm and dropout; the global rows get the same LayerNorm and
dropout and are prepended to the embedding output, and block padding appends zero vectors
(LSG_SPEC.md sections 4, 5), which is what the BERT-family encoder pre-hook does.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import LSGSelfAttention
from .bert import BertFamily


class LSGDistilBertAttention(LSGSelfAttention):
    """Replaces DistilBertSelfAttention (its out_lin included)."""

    projection_names = ("q_lin", "k_lin", "v_lin", "out_lin")

    def __init__(self, original: nn.Module, layout: Any) -> None:
        super().__init__(original, layout)
        self.dropout = original.dropout
        self.head_size = original.attention_head_size
        self.scaling = original.scaling

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        projections = (self.q_lin, self.k_lin, self.v_lin)
        return self.out_lin(self.lsg_context(hidden_states, attention_mask, projections, self.dropout.p)), None


class DistilBertFamily(BertFamily):
    attention_class = LSGDistilBertAttention
