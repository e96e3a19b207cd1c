"""Relative position biases inside LSG key sets (docs/LSG_SPEC.md section 7c).

T5-like models add to every score a learned per-head value looked up by a bucket of the relative position
key - query. The dense (heads, n, n) bias of the unconverted model is never built: the product computes the
bias of each key set it attends, from the positions of its keys (tokens, sparse items), so memory stays linear
in the input length. Global queries and global keys have no position and get no bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class RelativeBias:
    """score[h, q, k] += table[bucket(pos(k) - pos(q)), h].

    table: (buckets, heads), the layout of T5's `relative_attention_bias.weight` (the Parameter itself, so the
    bias trains through it); bucket: relative positions (long, any shape) -> bucket indices, same shape.
    """

    table: torch.Tensor
    bucket: Callable[[torch.Tensor], torch.Tensor]

    @property
    def num_heads(self) -> int:
        return self.table.shape[1]

    def by_distance(self, limit: int, dtype: torch.dtype) -> torch.Tensor:
        """(2 * limit + 1, heads): the bias of every distance -limit..limit (row limit + d for distance d), so
        that the bucket function runs once per distance rather than once per score."""
        distance = torch.arange(-limit, limit + 1, device=self.table.device)
        return self.table.to(dtype)[self.bucket(distance)]

    def same_for_heads(self, distance: torch.Tensor, limit: int, dtype: torch.dtype) -> torch.Tensor:
        """(heads, *distance.shape): the bias of relative positions shared by every head. Distances beyond
        +-limit are clamped (callers pass a limit that only masked keys exceed)."""
        return self.by_distance(limit, dtype)[distance.clamp(-limit, limit) + limit].movedim(-1, 0)

    def per_head(self, distance: torch.Tensor, limit: int, dtype: torch.dtype) -> torch.Tensor:
        """distance (batch, heads, ...) with each head's own relative positions -> its bias, same shape."""
        heads = torch.arange(self.num_heads, device=distance.device).view(1, -1, *[1] * (distance.dim() - 2))
        return self.by_distance(limit, dtype)[distance.clamp(-limit, limit) + limit, heads]
