"""What causal LSG keeps between generation steps, over bare tensors (docs/LSG_SPEC.md section 6, causal).

A causal token query at position p (block i = p // bs) reads the G globals, the tokens (i-1)*bs .. p of its local
window and the sparse_block_size items of the "before" window, items [(i-1)*step - sbs, (i-1)*step). Nothing older is
ever read again, so an exact cache holds, per layer:

* the G global keys/values (fixed after the prompt);
* a ring of 2 * block_size token slots: token p sits in slot p mod 2*bs, so the ring always holds the previous and the
  current block;
* a ring of sbs + step item slots: item j sits in slot j mod (sbs + step). A block's items are computed when its
  last token arrives and first read two blocks later; by then the ring holds exactly the before window and the
  items of the block in between.

Every sparsity type's items depend on their own block's tokens only (norm and lsh chunks, pooling groups and the
stride patterns all lie inside one block), plus, for bos_pooling, the query of token 0, which the cache keeps.
So the cache is exact for every type and its size does not depend on the prompt length.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import AttentionLayout
from .sparse import ITEM_KINDS, POSITION_KINDS, group_mask, norm_positions, sparse_items, sparse_kind, sparse_step
from .sparse import sparse_token_positions


class BlockItems(NamedTuple):
    """Items (batch, heads, S, d) of whole blocks, and whether each may be attended (batch, heads, S)."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor


def item_ring_size(layout: AttentionLayout) -> int:
    """Slots of the item ring: the before window plus the items of one block (0 without sparse keys)."""
    return layout.sparse_block_size + sparse_step(layout) if layout.has_sparse_keys else 0


def block_items(query_first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor,
                layout: AttentionLayout, scale: float, lsh_seed: int) -> BlockItems:
    """The sparse items of whole blocks of tokens, exactly as the attention product computes them.

    keys/values (batch, heads, n * bs, d) are the tokens of n whole blocks (heads: the query heads, keys repeated
    for grouped-query attention, as the product sees them); token_mask (batch, n * bs) bool; query_first (batch,
    heads, d) the query of token 0 (bos_pooling). Because every type's items depend on their own block only (see
    the module docstring), the items of one block equal that block's items in a whole-sequence computation.
    """
    kind = sparse_kind(layout)
    batch, heads, length, _ = keys.shape
    if kind == "norm" or kind in POSITION_KINDS:
        if kind == "norm":
            positions = norm_positions(keys, token_mask, layout)
        else:
            pattern = sparse_token_positions(layout, length, keys.device)
            positions = pattern[torch.arange(heads, device=keys.device) % pattern.shape[0]].expand(batch, -1, -1)
        rows = positions[..., None].expand(-1, -1, -1, keys.shape[-1])
        allowed = token_mask[:, None].expand(-1, heads, -1).gather(-1, positions)
        return BlockItems(keys.gather(2, rows), values.gather(2, rows), allowed)
    if kind in ITEM_KINDS:
        items = sparse_items(query_first, keys, values, token_mask, layout, scale, lsh_seed=lsh_seed)
        allowed = group_mask(token_mask, layout.sparsity_factor)[:, None].expand(-1, heads, -1)
        if items.mask is not None:
            allowed = allowed & items.mask
        return BlockItems(items.keys, items.values, allowed)
    raise ValueError(f"sparsity kind {kind!r} has no sparse items")


def token_slot_positions(positions: torch.Tensor, slots: int) -> torch.Tensor:
    """(..., slots) position held by every ring slot once the tokens up to `positions` (...,) are written: the
    latest position congruent to the slot (negative where no such token exists yet)."""
    slot = torch.arange(slots, device=positions.device)
    return positions[..., None] - (positions[..., None] - slot).remainder(slots)


def decode_key_mask(positions: torch.Tensor, layout: AttentionLayout, mask_first_token: bool) -> torch.Tensor:
    """(batch, 1, K) bool: which of [G globals; 2*bs token slots; item slots] the token query at `positions`
    (batch,) may attend, by position alone (item masks of lsh, norm and padding are added per layer).

    Token slots: positions (i-1)*bs .. p of the local window (i = p // bs); item slots: items of the before window,
    [(i-1)*step - sbs, (i-1)*step), when written: items exist up to the end of block i - 1.
    """
    g, bs = layout.num_global_tokens, layout.block_size
    block = positions // bs
    tokens = token_slot_positions(positions, 2 * bs)
    allowed_tokens = (tokens >= ((block - 1) * bs).clamp(min=0)[:, None]) & (tokens >= 0)
    if mask_first_token:
        allowed_tokens &= tokens != 0
    parts = [torch.ones(len(positions), g, dtype=torch.bool, device=positions.device), allowed_tokens]
    ring = item_ring_size(layout)
    if ring:
        step = sparse_step(layout)
        newest = block * step - 1  # the items of blocks 0 .. i-1 are written
        items = token_slot_positions(newest, ring)
        stop = (block - 1) * step
        parts.append((items >= 0) & (items >= stop[:, None] - layout.sparse_block_size) & (items < stop[:, None]))
    return torch.cat(parts, dim=-1)[:, None]
