"""Growing position tables in place: tiling learned tables (keeping offset rows) and sinusoidal ones.

LSG extrapolates a pretrained model by repeating its learned positions end to end (docs/LSG_SPEC.md
section 9). The first `offset` rows of RoBERTa- and BART-like tables are not positions (padding
and legacy rows) and stay where they are.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def tiled_table(table: torch.Tensor, rows: int, offset: int) -> torch.Tensor:
    """new[r] = old[r] for r < offset, else old[offset + (r - offset) mod (n - offset)]: always `rows` rows."""
    positions = table.shape[0] - offset
    if positions <= 0:
        raise ValueError(f"a position table of {table.shape[0]} rows has no positions after its offset of {offset}")
    index = torch.arange(rows - offset, device=table.device) % positions + offset
    return torch.cat([table[:offset], table.index_select(0, index)], dim=0)


def sinusoidal_table(rows: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Marian/Pegasus sinusoidal table: sin in the first half of the features, cos in the second."""
    position = torch.arange(rows, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * -(math.log(10000.0) / dim))
    table = torch.zeros(rows, dim, dtype=torch.float64)
    sentinel = dim // 2 + dim % 2
    table[:, :sentinel] = torch.sin(position * div[:sentinel])
    table[:, sentinel:] = torch.cos(position * div[: dim - sentinel])
    return table.to(dtype)


def replace_embedding_weight(embedding: nn.Embedding, weight: torch.Tensor) -> None:
    """Give an nn.Embedding a new table, keeping its dtype, device and trainability."""
    old = embedding.weight
    embedding.weight = nn.Parameter(weight.to(dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)
    embedding.num_embeddings = weight.shape[0]


def resize_index_buffers(module: nn.Module, rows: int) -> None:
    """Re-register the `position_ids` / `token_type_ids` buffers HF embeddings keep, at the new length."""
    if isinstance(getattr(module, "position_ids", None), torch.Tensor):
        old = module.position_ids
        module.register_buffer(
            "position_ids", torch.arange(rows, dtype=old.dtype, device=old.device).expand((1, -1)), persistent=False
        )
    if isinstance(getattr(module, "token_type_ids", None), torch.Tensor):
        old = module.token_type_ids
        module.register_buffer(
            "token_type_ids", torch.zeros((1, rows), dtype=old.dtype, device=old.device), persistent=False
        )
