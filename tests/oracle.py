"""A deliberately simple, dense reference of LSG attention (LSG_SPEC.md sections 6 and 7), for tests and pictures.

It shares nothing with lsg_patch.attention but the `AttentionLayout` record: for every query row it writes out
the list of keys the row attends to (`attended_keys`), computes the sparse items with plain Python loops, and
runs a float64 softmax per row. Slow on purpose; use it on tiny inputs only.

Key lists (`attended_keys`) describe one head. Each key is `(index, kind)`:
* kind "global": index is the global token 0..G-1.
* kind "local":  index is a token position 0..T-1 (on the full-attention path and for global queries every
  token is reported as "local").
* kind "sparse": for the position-based selections (sparsity_factor 1, "stride", "block_stride") index is the
  token position the sparse key is taken from; for the pooled/chosen selections ("norm", "pooling",
  "bos_pooling", "lsh") index is the position of the item in the sparse sequence of S = T / sparsity_factor
  items (item j summarises tokens near j * sparsity_factor).
Duplicates are real (the after window for odd block_size / sparsity_factor overlaps the local window and
those keys count twice in the softmax); keys outside the sequence are left out, as they are masked.
"""
from __future__ import annotations

import math

import torch

from lsg_patch.attention.layout import AttentionLayout

Key = tuple[int, str]


def attended_keys(layout: AttentionLayout, num_tokens: int, *, head: int = 0, causal: bool = False
                  ) -> list[list[Key]]:
    """For each of the G + T query rows (globals first), the keys it attends to, as `(index, kind)`.

    head matters for "stride" and "block_stride" only. causal follows `lsg_attention(causal=True)`.
    """
    return [_row_keys(layout, num_tokens, row, head, causal)
            for row in range(layout.num_global_tokens + num_tokens)]


def oracle_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token_mask: torch.Tensor,
                     layout: AttentionLayout, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Float64 LSG attention of (batch, heads, G + T, d) tensors; token_mask (batch, T) bool, True = valid."""
    query, key, value = query.double(), key.double(), value.double()
    n, h, length, d = query.shape
    g = layout.num_global_tokens
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros_like(query)
    for head in range(h):
        rows = attended_keys(layout, length - g, head=head, causal=causal)
        for b in range(n):
            valid = [bool(x) for x in token_mask[b]]
            items = _sparse_items(query[b, head, g], key[b, head, g:], value[b, head, g:], valid, layout, scale)
            keys = torch.cat([key[b, head], items[0]])
            values = torch.cat([value[b, head], items[1]])
            allowed = [True] * g + valid + items[2]
            for row, row_keys in enumerate(rows):
                sources = [_source(layout, length - g, k) for k in row_keys]
                scores = keys[sources] @ query[b, head, row] * scale
                scores = scores.masked_fill(~torch.tensor([allowed[s] for s in sources]), -math.inf)
                out[b, head, row] = scores.softmax(-1) @ values[sources]
    return out


def selection(layout: AttentionLayout) -> str:
    """What the sparse part runs: "none", "raw" (sparsity_factor 1) or a type; lsh with sf == sbs is bos_pooling."""
    sf, sbs, kind = layout.sparsity_factor, layout.sparse_block_size, layout.sparsity_type
    if kind == "none" or sbs <= 0 or sf <= 0:
        return "none"
    if sf == 1:
        return "raw"
    if kind == "lsh" and sf == sbs:
        return "bos_pooling"
    return kind


def norm_chunk(layout: AttentionLayout) -> int:
    """Chunk of the norm selection: the largest multiple of sf dividing bs, at most max(min(bs, sbs), sf)."""
    sf, bs, sbs = layout.sparsity_factor, layout.block_size, layout.sparse_block_size
    candidates = [c for c in range(1, bs + 1) if c % sf == 0 and bs % c == 0 and c <= max(min(bs, sbs), sf)]
    return max(candidates)


def _row_keys(layout: AttentionLayout, t: int, row: int, head: int, causal: bool) -> list[Key]:
    g, bs = layout.num_global_tokens, layout.block_size
    keys: list[Key] = [(i, "global") for i in range(g)]
    if row < g:
        return keys if causal else keys + [(i, "local") for i in range(t)]
    p = row - g
    if t <= 2 * bs:
        return keys + [(i, "local") for i in range(t) if not causal or i <= p]
    block = p // bs
    keys += [(_sparse_index(layout, j, head), "sparse") for j in _window_items(layout, t, block, causal)]
    return keys + [(i, "local") for i in range((block - 1) * bs, (block + 2) * bs)
                   if 0 <= i < t and (not causal or i <= p)]


def _window_items(layout: AttentionLayout, t: int, block: int, causal: bool) -> list[int]:
    """Sparse items of the before window, then (not causal) of the after window, that exist."""
    if selection(layout) == "none":
        return []
    sf, sbs = layout.sparsity_factor, layout.sparse_block_size
    step = layout.block_size // sf
    before = list(range((block - 1) * step - sbs, (block - 1) * step))
    after_start = (block + 2) * step - (2 if step % 2 == 1 else 0)
    after = [] if causal else list(range(after_start, after_start + sbs))
    return [j for j in before + after if 0 <= j < t // sf]


def _sparse_index(layout: AttentionLayout, item: int, head: int) -> int:
    """Token position of a sparse item for the position-based selections, else the item itself."""
    kind, sf, bs = selection(layout), layout.sparsity_factor, layout.block_size
    step = bs // sf
    if kind == "stride":
        return item * sf + head % sf
    if kind == "block_stride":
        return (item // step) * bs + (head * step + item % step) % bs
    return item


def _source(layout: AttentionLayout, t: int, key: Key) -> int:
    """Row of a key in the oracle's per-head bank [globals; tokens; sparse items]."""
    index, kind = key
    g = layout.num_global_tokens
    if kind == "global":
        return index
    if kind == "sparse" and selection(layout) not in {"raw", "stride", "block_stride"}:
        return g + t + index
    return g + index


def _sparse_items(q_first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: list[bool],
                  layout: AttentionLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Sparse items of one (batch row, head) for the pooled/chosen selections: keys, values, valid flags.

    None on the full-attention path (at most 2 blocks).
    """
    kind, sf = selection(layout), layout.sparsity_factor
    empty = keys[:0]
    if kind in {"none", "raw", "stride", "block_stride"} or len(valid) <= 2 * layout.block_size:
        return empty, empty, []
    if kind == "lsh":
        raise NotImplementedError("lsh is random; the oracle covers it only where it runs bos_pooling or sf == 1")
    item_keys, item_values, item_valid = [], [], []
    if kind == "norm":
        c = norm_chunk(layout)
        for start in range(0, len(valid), c):
            norms = [keys[start + i].detach().norm().item() if valid[start + i] else 0.0 for i in range(c)]
            chosen = sorted(range(c), key=lambda i: norms[i])[c - c // sf:]
            item_keys += [keys[start + i] for i in chosen]
            item_values += [values[start + i] for i in chosen]
            item_valid += [valid[start + i] for i in chosen]
    else:
        for start in range(0, len(valid), sf):
            members = range(start, start + sf)
            weights = _group_weights(q_first, keys, valid, members, kind, scale)
            item_keys.append(sum(w * keys[i] for w, i in zip(weights, members)))
            item_values.append(sum(w * values[i] for w, i in zip(weights, members)))
            item_valid.append(any(valid[i] for i in members))
    return torch.stack(item_keys), torch.stack(item_values), item_valid


def _group_weights(q_first: torch.Tensor, keys: torch.Tensor, valid: list[bool], members: range, kind: str,
                   scale: float) -> list[float] | list[torch.Tensor]:
    """pooling: 1 / (count + 1e-6) on valid members; bos_pooling: softmax of q_first . k * scale + mask."""
    if kind == "pooling":
        count = sum(valid[i] for i in members)
        return [valid[i] / (count + 1e-6) for i in members]
    minimum = torch.finfo(torch.float64).min
    scores = torch.stack([q_first @ keys[i] * scale + (0.0 if valid[i] else minimum) for i in members])
    return list(scores.softmax(-1))  # tensors, not floats: the weights stay differentiable
