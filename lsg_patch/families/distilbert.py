"""DistilBERT: the BERT-family hooks on `transformer`, with DistilBERT's attention projections.

Embeddings are word + position, then LayerNorm and dropout; the global rows get the same LayerNorm and
dropout and are prepended to the embedding output, and block padding appends zero vectors
(LSG_SPEC.md sections 4, 5), which is what the BERT-family encoder pre-hook does.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention import lsg_attention
from .base import LSGSelfAttention
from .bert import BertFamily


class LSGDistilBertAttention(LSGSelfAttention):
    """Replaces DistilBertSelfAttention (its out_lin included)."""

    projection_names = ("q_lin", "k_lin", "v_lin", "out_lin")

    def __init__(self, original: nn.Module, layout: Any) -> None:
        super().__init__(original, layout)
        self.dropout = original.dropout
        self.attention_head_size = original.attention_head_size
        self.scaling = original.scaling

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        encoder_mask = self.encoder_mask(attention_mask)
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.attention_head_size)
        query = self.q_lin(hidden_states).view(shape).transpose(1, 2)
        key = self.k_lin(hidden_states).view(shape).transpose(1, 2)
        value = self.v_lin(hidden_states).view(shape).transpose(1, 2)
        context = lsg_attention(
            query,
            key,
            value,
            encoder_mask.mask,
            self.layout,
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=self.scaling,
        )
        return self.out_lin(context.transpose(1, 2).reshape(batch, length, -1)), None


class DistilBertFamily(BertFamily):
    attention_class = LSGDistilBertAttention
