"""The LSG attention parameters the attention product needs, free of any transformers type.

`LSGConfig` (lsg_patch.config) validates user input and turns into one of these; the attention
product only ever sees this small frozen record, so it can be tested and benchmarked on bare tensors.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionLayout:
    """Shape of the LSG key set of every query block (see docs/LSG_SPEC.md sections 6 and 7)."""

    num_global_tokens: int = 1
    block_size: int = 128
    sparse_block_size: int = 128
    sparsity_factor: int = 2
    sparsity_type: str = "norm"  # none | norm | pooling | lsh | stride | block_stride | bos_pooling
    lsh_num_pre_rounds: int = 1

    @property
    def has_sparse_keys(self) -> bool:
        """True when query blocks attend to sparse keys besides the local and global ones."""
        return self.sparsity_type != "none" and self.sparse_block_size > 0 and self.sparsity_factor > 0

    def uses_full_attention(self, num_tokens: int) -> bool:
        """Short inputs (at most two blocks) take plain full attention, as the reference does."""
        return num_tokens <= 2 * self.block_size
