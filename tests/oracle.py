"""A deliberately simple, dense reference of LSG attention (docs/LSG_SPEC.md sections 6 and 7), for tests and
pictures.

It shares nothing with lsg_patch.attention but the `AttentionLayout` record and, for lsh, the random hyperplanes
(`lsh_hyperplanes`, the planes the product draws for a seed): for every query row it writes out the list of keys
the row attends to (`attended_keys`), computes the sparse items with plain Python loops (the norm/lsh chunk size
included, written again here from its definition), and runs a float64 softmax per row. Slow on purpose; use it
on tiny inputs only.

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
from typing import Callable

import torch

from lsg_patch.attention.layout import AttentionLayout
from lsg_patch.attention.sparse import lsh_hyperplanes

Key = tuple[int, str]


def attended_keys(layout: AttentionLayout, num_tokens: int, *, head: int = 0, causal: bool = False
                  ) -> list[list[Key]]:
    """For each of the G + T query rows (globals first), the keys it attends to, as `(index, kind)`.

    head matters for "stride" and "block_stride" only. causal follows `lsg_attention(causal=True)`.
    """
    row_keys = _causal_row_keys if causal else _row_keys
    return [row_keys(layout, num_tokens, row, head) for row in range(layout.num_global_tokens + num_tokens)]


def oracle_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token_mask: torch.Tensor,
                     layout: AttentionLayout, *, causal: bool = False, scale: float | None = None,
                     lsh_seed: int = 0, lsh_planes: list[torch.Tensor] | None = None,
                     bias: Callable[[int, int], float | torch.Tensor] | None = None) -> torch.Tensor:
    """Float64 LSG attention of (batch, heads, G + T, d) tensors; token_mask (batch, T) bool, True = valid.

    lsh hashes with `lsh_planes` (one (heads, 1, d, k) tensor per round) or, if None, with the planes the
    product draws for `lsh_seed`. bias(head, key position - query position) is added to every score between a
    token query and a non-global key (LSG_SPEC section 7c): a key's position is its token, a norm item's the
    token it picked, any other computed item j's j * sparsity_factor.
    """
    query, key, value = query.double(), key.double(), value.double()
    n, h, length, d = query.shape
    g = layout.num_global_tokens
    scale = 1 / math.sqrt(d) if scale is None else scale
    if selection(layout) == "lsh" and lsh_planes is None:
        lsh_planes = lsh_hyperplanes(layout, h, d, seed=lsh_seed, dtype=torch.float64, device="cpu")
    out = torch.zeros_like(query)
    for head in range(h):
        rows = attended_keys(layout, length - g, head=head, causal=causal)
        head_planes = None if lsh_planes is None else [p[head, 0].double().cpu() for p in lsh_planes]
        for b in range(n):
            valid = [bool(x) for x in token_mask[b]]
            items = _sparse_items(query[b, head, g], key[b, head, g:], value[b, head, g:], valid, layout, scale,
                                  head_planes)
            keys = torch.cat([key[b, head], items[0]])
            values = torch.cat([value[b, head], items[1]])
            allowed = [True] * g + valid + items[2]
            positions = [None] * g + list(range(length - g)) + items[3]  # None: a global, no position
            for row, row_keys in enumerate(rows):
                sources = [_source(layout, length - g, k) for k in row_keys]
                scores = keys[sources] @ query[b, head, row] * scale
                if bias is not None and row >= g:
                    scores = scores + torch.stack([  # stacked, not copied: a tensor bias stays differentiable
                        torch.as_tensor(0.0 if positions[s] is None else bias(head, positions[s] - (row - g)),
                                        dtype=scores.dtype) for s in sources])
                scores = scores.masked_fill(~torch.tensor([allowed[s] for s in sources]), -math.inf)
                out[b, head, row] = scores.softmax(-1) @ values[sources]
    return out


def oracle_lsh_items(keys: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor, layout: AttentionLayout,
                     lsh_planes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 lsh items (batch, heads, S, d) of keys/values (batch, heads, T, d), in item order, and their
    validity (batch, heads, S) bool; lsh_planes: one (heads, 1, d, k) tensor per round."""
    n, h = keys.shape[:2]
    rows = [[_lsh_items(keys[b, head].double(), values[b, head].double(), [bool(x) for x in token_mask[b]],
                        layout, [p[head, 0].double().cpu() for p in lsh_planes]) for head in range(h)]
            for b in range(n)]
    return tuple(torch.stack([torch.stack([torch.as_tensor(r[part]) for r in row]) for row in rows])
                 for part in range(3))


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
    """Token chunk c of norm and lsh.

    The reference uses c = min(block_size, sparse_block_size), which must be a multiple of sparsity_factor and
    divide block_size (so that chunks tile every block); lsg_patch keeps that c where it qualifies and otherwise
    the next smaller size that does, never going below sparsity_factor (at least one item per chunk).
    """
    sf, bs, sbs = layout.sparsity_factor, layout.block_size, layout.sparse_block_size
    c = max(min(bs, sbs), sf)
    while c % sf != 0 or bs % c != 0:
        c -= 1
    return c


def _row_keys(layout: AttentionLayout, t: int, row: int, head: int) -> list[Key]:
    """Keys of one query row, bidirectional (LSG_SPEC section 6, items 1 and 2)."""
    g, bs = layout.num_global_tokens, layout.block_size
    keys: list[Key] = [(i, "global") for i in range(g)]
    if row < g or t <= 2 * bs:
        return keys + [(i, "local") for i in range(t)]
    block = (row - g) // bs
    items = _before_window(layout, t, block) + _after_window(layout, t, block)
    keys += [(_sparse_index(layout, j, head), "sparse") for j in items]
    return keys + [(i, "local") for i in range((block - 1) * bs, (block + 2) * bs) if 0 <= i < t]


def _causal_row_keys(layout: AttentionLayout, t: int, row: int, head: int) -> list[Key]:
    """Keys of one query row, causal (LSG_SPEC section 6 item 5, `lsg_attention(causal=True)`).

    A global query sees the global keys only. A token query at position p sees the globals and, on the
    full-attention path (T <= 2 * block_size), every token <= p; otherwise the sparse "before" window (items
    made from tokens that precede its local window) and the tokens of its local window up to p, i.e. the
    previous block and its own block up to p.
    """
    g, bs = layout.num_global_tokens, layout.block_size
    globals_: list[Key] = [(i, "global") for i in range(g)]
    if row < g:
        return globals_
    p = row - g
    if t <= 2 * bs:
        return globals_ + [(i, "local") for i in range(p + 1)]
    block = p // bs
    before: list[Key] = [(_sparse_index(layout, j, head), "sparse") for j in _before_window(layout, t, block)]
    local: list[Key] = [(i, "local") for i in range(max(0, (block - 1) * bs), p + 1)]
    return globals_ + before + local


def _before_window(layout: AttentionLayout, t: int, block: int) -> list[int]:
    """Sparse items [(i-1)*step - sbs, (i-1)*step) of block i that exist (none without sparse keys)."""
    if selection(layout) == "none":
        return []
    step, sbs = layout.block_size // layout.sparsity_factor, layout.sparse_block_size
    return [j for j in range((block - 1) * step - sbs, (block - 1) * step) if 0 <= j < t // layout.sparsity_factor]


def _after_window(layout: AttentionLayout, t: int, block: int) -> list[int]:
    """Sparse items [(i+2)*step, +sbs) of block i that exist, started 2 items earlier when step is odd."""
    if selection(layout) == "none":
        return []
    step, sbs = layout.block_size // layout.sparsity_factor, layout.sparse_block_size
    start = (block + 2) * step - (2 if step % 2 == 1 else 0)
    return [j for j in range(start, start + sbs) if 0 <= j < t // layout.sparsity_factor]


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
                  layout: AttentionLayout, scale: float, lsh_planes: list[torch.Tensor] | None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[bool], list[int]]:
    """Sparse items of one (batch row, head) for the pooled/chosen selections: keys, values, valid flags and
    positions (norm: the picked token; the others: item j at j * sparsity_factor).

    Empty on the full-attention path (at most 2 blocks). lsh_planes: this head's (d, k) planes, one per round.
    """
    kind, sf = selection(layout), layout.sparsity_factor
    empty = keys[:0]
    if kind in {"none", "raw", "stride", "block_stride"} or len(valid) <= 2 * layout.block_size:
        return empty, empty, [], []
    if kind == "lsh":
        assert lsh_planes is not None
        lsh_keys, lsh_values, lsh_valid = _lsh_items(keys, values, valid, layout, lsh_planes)
        return lsh_keys, lsh_values, lsh_valid, [j * sf for j in range(len(lsh_valid))]
    item_keys, item_values, item_valid, item_positions = [], [], [], []
    if kind == "norm":
        c = norm_chunk(layout)
        for start in range(0, len(valid), c):
            # masked tokens count as norm 0; the c / sf largest are kept, listed by ascending (norm, position),
            # norms within a relative 1e-5 of the next smaller one being equal (LSG_SPEC section 7, norm ties)
            norms = [keys[start + i].detach().norm().item() if valid[start + i] else 0.0 for i in range(c)]
            chosen = sorted(range(c), key=lambda i: (_tie_rank(norms, i), i))[c - c // sf:]
            item_keys += [keys[start + i] for i in chosen]
            item_values += [values[start + i] for i in chosen]
            item_valid += [valid[start + i] for i in chosen]
            item_positions += [start + i for i in chosen]
    else:
        for start in range(0, len(valid), sf):
            members = range(start, start + sf)
            weights = _group_weights(q_first, keys, valid, members, kind, scale)
            item_keys.append(sum(w * keys[i] for w, i in zip(weights, members)))
            item_values.append(sum(w * values[i] for w, i in zip(weights, members)))
            item_valid.append(any(valid[i] for i in members))
            item_positions.append(start)
    return torch.stack(item_keys), torch.stack(item_values), item_valid, item_positions


def _tie_rank(norms: list[float], i: int) -> int:
    """How many steps up the ascending norms take before norms[i]; a step is a norm more than 1e-5 (relative to
    itself) above the one below it, so nearly equal norms share a rank."""
    ascending = sorted(norms)
    steps = sum(1 for below, above in zip(ascending, ascending[1:])
                if above <= norms[i] and above - below > 1e-5 * above)
    return steps


def _lsh_items(keys: torch.Tensor, values: torch.Tensor, valid: list[bool], layout: AttentionLayout,
               planes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """lsh items of one (batch row, head), from LSG_SPEC section 7, tracking which tokens end up in each bucket.

    Per chunk of c tokens, every valid token starts as its own bucket (a masked token is a zero key that counts
    for nothing, so it joins none); each pre-round rehashes the buckets into c buckets, the last round into
    c / sf, a bucket going where its key sum points. An item is the sum of its tokens / (count + 1e-8), masked
    iff it has no token.
    """
    c, sf = norm_chunk(layout), layout.sparsity_factor
    rounds = [c] * layout.lsh_num_pre_rounds + [c // sf]
    assert len(planes) == len(rounds), (len(planes), len(rounds))
    item_keys, item_values, item_valid = [], [], []
    for start in range(0, len(valid), c):
        buckets: list[list[int]] = [[start + i] if valid[start + i] else [] for i in range(c)]
        for count, plane in zip(rounds, planes):
            assert plane.shape == (keys.shape[-1], max(count // 2, 1)), (plane.shape, count)
            merged: list[list[int]] = [[] for _ in range(count)]
            for members in buckets:
                if members:  # an empty bucket is a zero key: it adds nothing wherever it goes
                    merged[_lsh_bucket(sum(keys[m] for m in members), plane, count)] += members
            buckets = merged
        for members in buckets:
            item_keys.append(sum((keys[m] for m in members), keys.new_zeros(keys.shape[-1])) / (len(members) + 1e-8))
            item_values.append(sum((values[m] for m in members), values.new_zeros(values.shape[-1]))
                               / (len(members) + 1e-8))
            item_valid.append(bool(members))
    return torch.stack(item_keys), torch.stack(item_values), item_valid


def _lsh_bucket(key: torch.Tensor, plane: torch.Tensor, count: int) -> int:
    """Bucket of a key among `count`: the first maximum of [x.P_0 .. x.P_k-1, -x.P_0 .. -x.P_k-1] for the
    key's direction x (k = count // 2 planes; an odd count leaves the last bucket empty); one bucket takes all."""
    if count == 1:
        return 0
    direction = key.detach() / max(key.norm().item(), 1e-12)  # hashing is not differentiated
    dots = [float(direction @ plane[:, j]) for j in range(count // 2)]
    candidates = dots + [-x for x in dots]
    return candidates.index(max(candidates))


def _group_weights(q_first: torch.Tensor, keys: torch.Tensor, valid: list[bool], members: range, kind: str,
                   scale: float) -> list[float] | list[torch.Tensor]:
    """pooling: 1 / (count + 1e-6) on valid members; bos_pooling: softmax of q_first . k * scale + mask."""
    if kind == "pooling":
        count = sum(valid[i] for i in members)
        return [valid[i] / (count + 1e-6) for i in members]
    minimum = torch.finfo(torch.float64).min
    scores = torch.stack([q_first @ keys[i] * scale + (0.0 if valid[i] else minimum) for i in members])
    return list(scores.softmax(-1))  # tensors, not floats: the weights stay differentiable
