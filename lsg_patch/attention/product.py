"""The LSG attention product (LSG_SPEC.md section 6) over bare tensors.

Token queries are cut into blocks of block_size; every block attends to its own key set (globals, sparse
windows, the three local blocks; layout in `masks`). The key sets of all blocks are gathered once per layer
into a (batch, heads * blocks, K, d) tensor and the blocks are folded into the batch dimension of a single
`scaled_dot_product_attention` call with a boolean mask; global queries take one more, full, call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import AttentionLayout
from .masks import LSGMask, causal_key_count
from .sparse import ITEM_KINDS, sparse_items, sparse_kind


def lsg_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask,
                  layout: AttentionLayout, *, dropout_p: float = 0.0, causal: bool = False,
                  scale: float | None = None) -> torch.Tensor:
    """LSG attention of (batch, heads, G + T, d) queries/keys/values, globals first; same shape out.

    Inputs of at most 2 blocks take plain attention over all G + T keys. Otherwise global queries attend to all
    keys and token block i to [globals; 2 * sparse_block_size sparse keys; tokens (i-1)*bs .. (i+2)*bs].
    scale defaults to d ** -0.5; dropout_p is applied to the attention probabilities.

    causal=True (BERT-like decoders): global queries attend to the global keys only; a token query at position
    p attends to the globals, the sparse "before" window (items whose tokens precede its local window) and
    the tokens at positions <= p within its local window (on the full-attention path: all tokens <= p).
    """
    g, t = layout.num_global_tokens, mask.num_tokens
    if query.shape[-2] != g + t:
        raise ValueError(f"expected {g} global + {t} token rows, got {query.shape[-2]}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if mask.index is None:
        return _full_attention(query, key, value, mask, g, causal, dropout_p, scale)
    global_rows = _global_rows(query[:, :, :g], key, value, mask, g, causal, dropout_p, scale)
    token_rows = _block_rows(query, key, value, mask, layout, causal, dropout_p, scale)
    return torch.cat([global_rows, token_rows], dim=2)


def _full_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask, g: int,
                    causal: bool, dropout_p: float, scale: float) -> torch.Tensor:
    """Plain attention over all G + T keys (short inputs)."""
    attn_mask = mask.full
    if causal:
        length = key.shape[-2]
        rows = torch.arange(length, device=key.device)[:, None]
        cols = torch.arange(length, device=key.device)
        attn_mask = attn_mask & ((cols < g) | ((rows >= g) & (cols <= rows)))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          scale=scale)


def _global_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask, g: int,
                 causal: bool, dropout_p: float, scale: float) -> torch.Tensor:
    """Global queries: all keys, or only the global keys when causal."""
    if causal:
        return F.scaled_dot_product_attention(query, key[:, :, :g], value[:, :, :g], dropout_p=dropout_p,
                                              scale=scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.full, dropout_p=dropout_p,
                                          scale=scale)


def _block_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask,
                layout: AttentionLayout, causal: bool, dropout_p: float, scale: float) -> torch.Tensor:
    """Token queries, block by block, in one SDPA call over (batch, heads * blocks)."""
    n, h, _, d = query.shape
    index, blocks = _key_sets(mask, layout, h, causal)
    if sparse_kind(layout) in ITEM_KINDS:
        key, value, blocks = _append_sparse_items(query, key, value, mask, layout, index, blocks, scale)
    num_blocks = index.shape[1]
    attn_mask = blocks.expand(n, h, -1, -1).reshape(n, h * num_blocks, 1, -1)
    if causal:
        attn_mask = attn_mask & _causal_pattern(layout.block_size, attn_mask.shape[-1], query.device)
    out = F.scaled_dot_product_attention(
        query[:, :, layout.num_global_tokens:].reshape(n, h * num_blocks, layout.block_size, d),
        _gather_blocks(key, index).flatten(1, 2),
        _gather_blocks(value, index).flatten(1, 2),
        attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out.view(n, h, -1, d)


def _key_sets(mask: LSGMask, layout: AttentionLayout, heads: int, causal: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key index (1 or heads, B, K) and block mask (batch, 1 or heads, B, K) of this call.

    Causal calls keep the prefix of the key set (globals, before window, previous and current block); per-head
    patterns (stride types) are spread over the heads.
    """
    index, blocks = mask.index, mask.blocks
    if causal:
        width = causal_key_count(layout)
        index, blocks = index[..., :width], blocks[..., :width]
    if index.shape[0] > 1:
        pattern = torch.arange(heads, device=index.device) % index.shape[0]
        index, blocks = index[pattern], blocks[:, pattern]
    return index, blocks


def _append_sparse_items(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask,
                         layout: AttentionLayout, index: torch.Tensor, blocks: torch.Tensor, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values followed by this layer's sparse items (where `index` expects them), and the block
    mask with the items' own masks where those depend on the keys (norm, lsh)."""
    g = layout.num_global_tokens
    items = sparse_items(query[:, :, g], key[:, :, g:], value[:, :, g:], mask.tokens, layout, scale)
    if items.mask is not None:
        source = torch.cat([mask.full.squeeze(2).expand(-1, key.shape[1], -1), items.mask], dim=-1)
        blocks = blocks & _gather_blocks(source, index)
    return torch.cat([key, items.keys], dim=2), torch.cat([value, items.values], dim=2), blocks


def _gather_blocks(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source (batch, heads, L, ...) taken at index (1 or heads, B, K): (batch, heads, B, K, ...), one copy.

    A head-independent index takes index_select, whose backward (index_add) is cheaper than advanced indexing's.
    """
    if index.shape[0] == 1:
        taken = source.index_select(2, index.flatten())
    else:
        heads = torch.arange(source.shape[1], device=source.device)[:, None]
        taken = source[:, heads, index.flatten(1)]
    return taken.view(*taken.shape[:2], *index.shape[1:], *taken.shape[3:])


def _causal_pattern(block_size: int, width: int, device: torch.device) -> torch.Tensor:
    """(block_size, width) bool: every key of the causal prefix, except current-block keys after the query."""
    pattern = torch.ones(block_size, width, dtype=torch.bool, device=device)
    pattern[:, width - block_size:] = torch.ones(block_size, block_size, dtype=torch.bool, device=device).tril()
    return pattern
