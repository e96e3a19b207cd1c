"""The per-layer plan of the block attention: what both block kernels need besides the tensors they differentiate."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """What the block attention of one layer needs besides the tensors it differentiates.

    rows: (batch or 1, heads or 1, B * Ks) source row of every side key. local_mask / side_mask: additive masks
    of the folded (batch * heads, B, bs, keys) calls. global_mask: additive (batch, 1, 1, G + T) key mask of the
    global queries, None when nothing is masked.
    """

    num_global: int
    block_size: int
    width: int
    scale: float
    rows: torch.Tensor
    local_mask: torch.Tensor
    side_mask: torch.Tensor
    global_mask: torch.Tensor | None
    causal: bool

    def global_keys(self, length: int) -> int:
        """How many keys the global queries see: the globals when causal, else all."""
        return self.num_global if self.causal else length

    @property
    def side_count(self) -> int:
        """Ks, the side keys of every block."""
        return self.side_mask.shape[-1]
