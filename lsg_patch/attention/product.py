"""The LSG attention product (docs/LSG_SPEC.md section 6) over bare tensors.

Token queries are cut into blocks of block_size, folded into the batch of flash-attention calls
(batch * heads, blocks, block_size, d). Every block attends to its own key set, in two parts:

* the local window, tokens (i-1)*bs .. (i+2)*bs: a strided view of one zero-padded copy of the keys;
* the side keys, globals and sparse windows: gathered once per layer straight from the keys (position types,
  norm) or from the pooled items, the only per-block copy.

Two backends (`backends.py`) compute the same key sets. On the CPU (`cpu_fused`), in training without dropout,
`_BlockAttention` runs both parts through the CPU flash-attention kernel and merges them
through their logsumexp, straight into an output laid out as (batch, G + T, heads, d) (merging the heads
afterwards is free); global queries (G of them) take one more flash call. Its backward reuses the kernel's
backward with the merged output and logsumexp, which is the exact gradient of one softmax over the union of
both parts, and sums the window and side gradients into one gradient per input, in the input's own layout,
without index buffers or zero-filled intermediates. Elsewhere without dropout (`portable`: every other device),
plain autograd runs the same key sets through the public `scaled_dot_product_attention` (both parts
concatenated).

On CUDA tensors where triton imports (the `triton` backend) the token blocks run the fused Triton kernels of
`triton_kernels.py` instead, dropout and bias included: they read the local windows in place and the side keys by
row, from the same plan.

Attention dropout, on every other backend, and on the CPU inference and a relative bias whose table trains, run
`blocked.py`: explicit scores over a few blocks at a time with the counter-based keep-mask of `dropout.py`,
regenerated in the backward rather than stored (the flash kernel has no dropout and no bias gradient; in
inference the blocked kernel is as fast and holds no per-layer copies of the windows and side keys).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backends import AttentionCall, Kernel, choose_kernel, exporting
from .bias import RelativeBias
from .blocked import BlockedAttention, rows_addressable
from .dropout import check_probability, draw_seed, dropout_codes, keep_mask, key_codes, row_codes
from .layout import AttentionLayout
from .masks import LSGMask, local_columns
from .plan import Plan
from .sparse import ITEM_KINDS, norm_positions, sparse_items, sparse_kind, sparse_step

KEY_HEAD_KINDS = frozenset({"none", "raw", "norm", "pooling"})  # side keys that depend on their key head alone

# Registered for CPU tensors only: reached through Kernel.CPU_FLASH alone, which choose_kernel takes on the
# "cpu_fused" backend only, never selected for another device.
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def lsg_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask,
                  layout: AttentionLayout, *, dropout_p: float = 0.0, causal: bool = False,
                  scale: float | None = None, lsh_seed: int = 0, bias: RelativeBias | None = None) -> torch.Tensor:
    """LSG attention of (batch, heads, G + T, d) queries/keys/values, globals first; same shape out.

    Inputs of at most 2 blocks take plain attention over all G + T keys. Otherwise global queries attend to all
    keys and token block i to [globals; 2 * sparse_block_size sparse keys; tokens (i-1)*bs .. (i+2)*bs].
    scale defaults to d ** -0.5; dropout_p is applied to the attention probabilities; lsh_seed seeds the lsh
    hyperplanes (one seed per layer: two calls on the same input give the same output).

    causal=True (BERT-like decoders): global queries attend to the global keys only; a token query at position
    p attends to the globals, the sparse "before" window (items whose tokens precede its local window) and
    the tokens at positions <= p within its local window (on the full-attention path: all tokens <= p).

    bias: a relative position bias added to every token-to-token score of every key set, from the positions of
    the keys (docs/LSG_SPEC.md section 7c); global queries and global keys get none. While its table takes a
    gradient, the CPU runs the blocked kernel (`blocked.py`), which returns the bias gradient.

    dropout_p (in [0, 1)) drops each attention probability by the keep-mask of `dropout.py`, a pure function of
    a seed drawn once per call from torch's default generator and of (batch row, head, query row, key).

    key and value may have fewer heads than query (grouped-query attention: kv_heads dividing heads, query head
    h reads key head h // (heads / kv_heads)). `backends.choose_kernel` decides which kernel runs and whether the
    keys are used as they are or repeated to the query heads.
    """
    g, t = layout.num_global_tokens, mask.num_tokens
    check_probability(dropout_p)
    if query.shape[-2] != g + t:
        raise ValueError(f"expected {g} global + {t} token rows, got {query.shape[-2]}")
    heads, key_heads = query.shape[1], key.shape[1]
    if heads % key_heads or value.shape[1] != key_heads:
        raise ValueError(f"{heads} query heads cannot share {key_heads} key and {value.shape[1]} value heads: "
                         "keys and values need the same number of heads, dividing the query heads")
    choice = choose_kernel(AttentionCall(
        device=query.device, block_path=mask.index is not None, dropout=dropout_p > 0,
        grouped_keys=key_heads != heads, side_keys_per_key_head=sparse_kind(layout) in KEY_HEAD_KINDS,
        has_bias=bias is not None, bias_trains=bias is not None and bias.table.requires_grad,
        needs_input_grad=torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)),
        exporting=exporting(), jit_tracing=torch.jit.is_tracing()))
    if key_heads != heads and not choice.shares_key_heads:
        key, value = (x.repeat_interleave(heads // key_heads, dim=1) for x in (key, value))
        key_heads = heads
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    full_mask = mask.full if mask.any_masked else None
    if mask.index is None:
        return _full_attention(query, key, value, full_mask, g, causal, dropout_p, scale, bias, choice.kernel)
    n = query.shape[0]
    side_keys, side_values, rows, side_mask = _side_sources(query, key, value, mask, layout, causal, scale, lsh_seed)
    width = (2 if causal else 3) * layout.block_size
    local_mask = mask.local[:, None, :, None, :width]
    if causal:
        local_mask = local_mask & _causal_pattern(layout.block_size, width, query.device)
    local_scores, side_scores = _additive(local_mask, query.dtype), _additive(side_mask, query.dtype)
    if bias is not None:
        local_scores = local_scores + _local_bias(bias, layout.block_size, width, query.dtype)
        side_scores = side_scores + _side_bias(bias, rows, layout, mask.num_tokens // layout.block_size,
                                                 causal, query.dtype)
    if choice.kernel is Kernel.EXPORTABLE:
        return _exportable_attention(query, key, value, side_keys, side_values, rows, local_scores, side_scores,
                                     full_mask, g, layout.block_size, width, scale, causal)
    plan = Plan(g, layout.block_size, width, scale, rows, _folded(local_scores, n, key_heads),
                _folded(side_scores, n, key_heads), None if causal or full_mask is None
                else _additive(full_mask, query.dtype), causal)
    if choice.kernel in (Kernel.BLOCKED, Kernel.TRITON):
        codes = None if dropout_p == 0 else dropout_codes(dropout_p, draw_seed(), n, heads, layout, t, width, causal,
                                                          query.device)
        kernel = BlockedAttention if choice.kernel is Kernel.BLOCKED else _triton_attention()
        return kernel.apply(query, key, value, side_keys, side_values, plan.local_mask, plan.side_mask, plan, codes)
    if choice.kernel is Kernel.CPU_FLASH:
        return _BlockAttention.apply(query, key, value, side_keys, side_values, plan)
    return _portable_attention(query, key, value, side_keys, side_values, plan)


def _triton_attention() -> type[torch.autograd.Function]:
    """The Triton kernels' autograd Function, imported on first use: importing it imports triton (optional, and
    read TRITON_INTERPRET at that moment), which choose_kernel has checked before picking Kernel.TRITON."""
    from .triton_kernels import TritonAttention
    return TritonAttention


def _full_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                    g: int, causal: bool, dropout_p: float, scale: float, bias: RelativeBias | None,
                    kernel: Kernel) -> torch.Tensor:
    """Plain attention over all G + T keys (short inputs); attn_mask None = nothing masked. FULL_EXPLICIT (dropout)
    keeps the scores of `dropout.py` (key identity = row), so it matches the block path's definition; FULL_SDPA
    lets keys and values have fewer heads than the queries (SDPA shares them)."""
    length = key.shape[-2]
    if causal:
        rows = torch.arange(length, device=key.device)[:, None]
        cols = torch.arange(length, device=key.device)
        pattern = (cols < g) | ((rows >= g) & (cols <= rows))
        attn_mask = pattern if attn_mask is None else attn_mask & pattern
    if bias is not None:  # (heads, G + T, G + T), zero on the global rows and columns
        tokens = torch.arange(length - g, device=key.device)
        scores = F.pad(bias.same_for_heads(tokens - tokens[:, None], length - g, query.dtype), (g, 0, g, 0))
        attn_mask = scores if attn_mask is None else _additive(attn_mask, query.dtype) + scores
    if kernel is Kernel.FULL_SDPA:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale,
                                              enable_gqa=key.shape[1] != query.shape[1])
    scores = query @ key.transpose(-1, -2) * scale
    if attn_mask is not None:
        scores = scores + (_additive(attn_mask, query.dtype) if attn_mask.dtype == torch.bool else attn_mask)
    n, h = query.shape[:2]
    keep = keep_mask(row_codes(draw_seed(), n, h, length, query.device)[..., None],
                     key_codes(torch.arange(length, device=query.device)), dropout_p)
    return (scores.softmax(dim=-1) * keep) @ value * (1 / (1 - dropout_p))


def _side_sources(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask,
                  layout: AttentionLayout, causal: bool, scale: float, lsh_seed: int
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Where the side keys (globals, sparse windows) of every block come from.

    Returns the side key/value sources (None: the keys/values themselves), the source row of every side key
    (batch or 1, heads or 1, B * Ks), and their mask (batch, 1 or heads, B, 1, Ks), heads being the key heads.
    Causal calls keep the globals and the before window only.
    """
    n, h = key.shape[:2]
    g, kind = layout.num_global_tokens, sparse_kind(layout)
    index, blocks = mask.index, mask.blocks
    if causal:
        width = local_columns(layout).start
        # index_select, not a slice: flattened below, which copies either way, and traces without size guards
        index = index.index_select(-1, torch.arange(width, device=index.device))
        blocks = blocks[..., :width]
    if index.shape[0] > 1:  # per-head patterns (stride types): spread over the heads
        pattern = torch.arange(h, device=index.device) % index.shape[0]
        index, blocks = index[pattern], blocks[:, pattern]
    rows = index.flatten(1)[None]
    side_keys = side_values = None
    if kind == "norm":  # items are picked keys: address them in the keys directly
        positions = norm_positions(key[:, :, g:], mask.tokens if mask.any_masked else None, layout)
        globals_ = torch.arange(g, device=key.device).expand(n, h, g)
        rows = torch.cat([globals_, positions + g], dim=-1).index_select(-1, rows.flatten())
        if mask.any_masked:
            allowed = mask.full.view(n, 1, -1).expand(n, h, -1).gather(-1, rows)
            blocks = blocks & allowed.view(n, h, *index.shape[1:])
    elif kind in ITEM_KINDS:
        items = sparse_items(query[:, :, g], key[:, :, g:], value[:, :, g:], mask.tokens, layout, scale,
                             lsh_seed=lsh_seed)
        side_keys, side_values = (torch.cat([x[:, :, :g], y], dim=2)
                                  for x, y in ((key, items.keys), (value, items.values)))
        if items.mask is not None:
            allowed = torch.cat([items.mask.new_ones(n, h, g), items.mask], dim=-1).gather(
                -1, rows.expand(n, h, -1))
            blocks = blocks & allowed.view(n, h, *index.shape[1:])
    return side_keys, side_values, rows, blocks[:, :, :, None]


def _take(source: torch.Tensor, rows: torch.Tensor, blocks: int) -> torch.Tensor:
    """source (batch, heads, L, d) at rows (batch or 1, heads or 1, B * Ks): (batch * heads, B, Ks, d); no autograd.

    Reads whole d-rows of the source's storage with index_select (several times faster than gather, which
    goes element by element), whatever the order of its batch, head and sequence dimensions.
    """
    n, h, _, d = source.shape
    if torch.compiler.is_compiling() or not rows_addressable(source):  # compiled code cannot sort strides
        source = source.contiguous()
    strides = [stride if size > 1 else 0 for size, stride in zip(source.shape[:3], source.stride()[:3])]
    s_n, s_h, s_l = (s // d for s in strides)
    base = (torch.arange(n, device=rows.device)[:, None, None] * s_n
            + torch.arange(h, device=rows.device)[:, None] * s_h)
    offsets = torch.add(base, rows, alpha=s_l).flatten()
    storage_rows = source.as_strided((source.numel() // d, d), (d, 1))
    return storage_rows.index_select(0, offsets).view(n * h, blocks, -1, d)


def _gather(source: torch.Tensor, rows: torch.Tensor, blocks: int) -> torch.Tensor:
    """`_take` for autograd (the portable path): gather, whose backward is one scatter_add."""
    n, h, _, d = source.shape
    return source.gather(2, rows[..., None].expand(n, h, -1, d)).view(n * h, blocks, -1, d)


def _windows(tokens_after: torch.Tensor, num_global: int, block_size: int, width: int) -> torch.Tensor:
    """(batch, heads, G + T, d) -> (batch * heads, B, width, d): block i sees tokens (i-1)*bs .. (i-1)*bs + width.

    One zero-padded copy of the keys; the overlapping windows are a view of it. Positions before token 0 are
    masked, so when G <= bs the globals serve as (part of) the leading padding.
    """
    n, h, length, d = tokens_after.shape
    g, bs = num_global, block_size
    lead = bs - g if g <= bs else bs
    source = tokens_after if g <= bs else tokens_after[:, :, g:]
    zero = source.new_zeros(())  # expanded, not filled: cat writes the padding itself
    padded = torch.cat([zero.expand(n, h, lead, d), source, zero.expand(n, h, bs, d)], dim=2)
    windows = padded.unfold(2, width, bs)[:, :, :(length - g) // bs]
    return windows.transpose(-1, -2).flatten(0, 1)


def _global_probs(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Attention probabilities (batch, heads, G, keys) of the G global queries, from their logsumexp."""
    scores = query[:, :, :plan.num_global] @ key[:, :, :plan.global_keys(key.shape[2])].transpose(-1, -2)
    scores = scores * plan.scale
    if plan.global_mask is not None:
        scores = scores + plan.global_mask
    return scores.sub_(lse.unsqueeze(-1)).exp_()


def _fold_windows(grad: torch.Tensor, extra: torch.Tensor, into: torch.Tensor, plan: Plan) -> None:
    """Write `into` (batch, heads, G + T, d): `extra` (batch, heads, G or G + T, d) plus, on the token rows, the
    sum of the window gradients (batch * heads, B, width, d) that cover each token: block j is slab 1 of window
    j, slab 0 of window j + 1 and (non-causal) slab 2 of window j - 1."""
    n, h = into.shape[:2]
    g, bs = plan.num_global, plan.block_size
    slabs = grad.unflatten(0, (n, h)).unflatten(3, (-1, bs))
    tokens = into[:, :, g:].unflatten(2, (-1, bs))
    into[:, :, :g] = extra[:, :, :g]
    if extra.shape[2] > g:
        torch.add(slabs[:, :, :, 1], extra[:, :, g:].unflatten(2, (-1, bs)), out=tokens)
    else:
        tokens.copy_(slabs[:, :, :, 1])
    tokens[:, :, :-1] += slabs[:, :, 1:, 0]
    if slabs.shape[3] > 2:
        tokens[:, :, 1:] += slabs[:, :, :-1, 2]


class _BlockAttention(torch.autograd.Function):
    """LSG attention without dropout: (batch, heads, G + T, d), laid out as (batch, G + T, heads, d).

    side_keys / side_values: where the side keys are gathered from (None: key / value themselves). Masks are
    additive; every token row keeps at least one side key (the globals). Forward: the local and side parts
    from two flash-attention calls, out = lerp(out_side, out_local, sigmoid(lse_local - lse_side)).
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                side_keys: torch.Tensor | None, side_values: torch.Tensor | None, plan: Plan) -> torch.Tensor:
        n, h, length, d = query.shape
        g, bs = plan.num_global, plan.block_size
        blocks = (length - g) // bs
        queries = query[:, :, g:].reshape(n * h, blocks, bs, d)
        # one part at a time, so that only one part's key set is alive at once
        local_keys, local_values = (_windows(x, g, bs, plan.width) for x in (key, value))
        out_a, lse_a = _flash(queries, local_keys, local_values, attn_mask=plan.local_mask, scale=plan.scale)
        del local_keys, local_values
        side_k = _take(key if side_keys is None else side_keys, plan.rows, blocks)
        side_v = _take(value if side_values is None else side_values, plan.rows, blocks)
        out_b, lse_b = _flash(queries, side_k, side_v, attn_mask=plan.side_mask, scale=plan.scale)
        del side_k, side_v
        out = torch.empty_like(query)
        keys = plan.global_keys(length)
        out[:, :, :g], lse_g = _flash(query[:, :, :g], key[:, :, :keys], value[:, :, :keys],
                                      attn_mask=plan.global_mask, scale=plan.scale)
        weight = torch.sigmoid(lse_a - lse_b).unsqueeze(-1).to(out.dtype)
        out[:, :, g:].unflatten(2, (blocks, bs)).copy_(  # not lerp(out=...): compiled code needs contiguous out=
            torch.lerp(out_b.unflatten(0, (n, h)), out_a.unflatten(0, (n, h)), weight.unflatten(0, (n, h))))
        # the key sets are rebuilt in the backward rather than kept: peak memory stays that of the inputs
        ctx.save_for_backward(query, key, value, side_keys, side_values, out, lse_a, lse_b, lse_g)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, side_keys, side_values, out, lse_a, lse_b, lse_g = ctx.saved_tensors
        plan = ctx.plan
        n, h, length, d = query.shape
        g, bs, keys = plan.num_global, plan.block_size, plan.global_keys(length)
        blocks = (length - g) // bs
        lse = torch.logaddexp(lse_a, lse_b)
        queries = query[:, :, g:].reshape(n * h, blocks, bs, d)
        grad_tokens = grad_out[:, :, g:].reshape(queries.shape)
        out_tokens = out[:, :, g:].reshape(queries.shape)
        dquery, dkey, dvalue = (torch.empty_like(x) for x in (query, key, value))
        grad_global = grad_out[:, :, :g]
        probs = _global_probs(query, key, lse_g, plan)
        dprobs = grad_global @ value[:, :, :keys].transpose(-1, -2)
        dscores = probs * (dprobs - (dprobs * probs).sum(dim=-1, keepdim=True)) * plan.scale
        dquery[:, :, :g] = dscores @ key[:, :, :keys]
        # one part at a time, rebuilding its key set, so that only one part's buffers are alive at once
        local_keys, local_values = (_windows(x, g, bs, plan.width) for x in (key, value))
        dq_tokens, dk_a, dv_a = _flash_backward(grad_tokens, queries, local_keys, local_values, out_tokens, lse,
                                                0.0, False, attn_mask=plan.local_mask, scale=plan.scale)
        del local_keys, local_values
        _fold_windows(dk_a, dscores.transpose(-1, -2) @ query[:, :, :g], dkey, plan)
        _fold_windows(dv_a, probs.transpose(-1, -2) @ grad_global, dvalue, plan)
        del dk_a, dv_a
        side_k = _take(key if side_keys is None else side_keys, plan.rows, blocks)
        side_v = _take(value if side_values is None else side_values, plan.rows, blocks)
        dq_b, dk_b, dv_b = _flash_backward(grad_tokens, queries, side_k, side_v, out_tokens, lse, 0.0, False,
                                           attn_mask=plan.side_mask, scale=plan.scale)
        del side_k, side_v
        torch.add(dq_tokens.unflatten(0, (n, h)), dq_b.unflatten(0, (n, h)),
                  out=dquery[:, :, g:].unflatten(2, (-1, bs)))
        # the kernel lays its side gradients out as (N, Ks, B, d): scatter them in that order, without a copy
        rows = plan.rows.unflatten(-1, (blocks, -1)).transpose(-1, -2).flatten(-2)[..., None].expand(n, h, -1, d)
        side_grads = []
        for source, full, side_grad in ((side_keys, dkey, dk_b), (side_values, dvalue, dv_b)):
            target = full if source is None else torch.zeros_like(source)
            target.scatter_add_(2, rows, side_grad.transpose(1, 2).reshape(n, h, -1, d))
            side_grads.append(None if source is None else target)
        return dquery, dkey, dvalue, side_grads[0], side_grads[1], None


def _portable_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, side_keys: torch.Tensor | None,
                        side_values: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """The same attention from public ops only, through plain autograd (any device, without dropout): one SDPA
    call for the global queries, one over the concatenated local and side keys for the token blocks."""
    n, h, length, d = query.shape
    g, bs = plan.num_global, plan.block_size
    blocks, keys = (length - g) // bs, plan.global_keys(length)
    global_rows = F.scaled_dot_product_attention(query[:, :, :g], key[:, :, :keys], value[:, :, :keys],
                                                 attn_mask=plan.global_mask, scale=plan.scale)
    keys_, values_ = (torch.cat([_windows(x, g, bs, plan.width), _gather(x if s is None else s, plan.rows, blocks)],
                                dim=2) for x, s in ((key, side_keys), (value, side_values)))
    token_rows = F.scaled_dot_product_attention(
        query[:, :, g:].reshape(n * h, blocks, bs, d), keys_, values_,
        attn_mask=_cat_masks(plan.local_mask, plan.side_mask), scale=plan.scale)
    return torch.cat([global_rows, token_rows.reshape(n, h, -1, d)], dim=2)


def _exportable_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          side_keys: torch.Tensor | None, side_values: torch.Tensor | None, rows: torch.Tensor,
                          local_scores: torch.Tensor, side_scores: torch.Tensor, full_mask: torch.Tensor | None,
                          g: int, block_size: int, width: int, scale: float, causal: bool) -> torch.Tensor:
    """The block path as torch.export traces it: explicit scores over every block's key set, built with static-shape
    gathers and concatenations (no strided views, no Python branch on the length), so one graph serves every length.

    local_scores (batch, 1 or heads, B, 1 or bs, width) and side_scores (batch, 1 or heads, B, 1 or bs, Ks) are the
    additive masks (plus bias) of the two parts; full_mask the (batch, 1, 1, G + T) key mask of the global queries.
    Scores are (batch, heads, B, bs, width + Ks): linear in the length.
    """
    n, h, length, d = query.shape
    # contiguous: matmul would fold the batch dimensions of a strided view, and the tracer specialise on batch 1
    key, value = (x.contiguous() for x in (key, value))
    query = query.contiguous() * scale  # scaled once, not every score: one pass less over the (.., width + Ks) scores
    keys = g if causal else length
    global_scores = query[:, :, :g] @ key[:, :, :keys].transpose(-1, -2)
    if full_mask is not None and not causal:
        global_scores = global_scores + _additive(full_mask, query.dtype)
    global_rows = global_scores.softmax(dim=-1) @ value[:, :, :keys]
    blocks = (length - g) // block_size
    keys_, values_ = (torch.cat([_stacked_windows(x, g, block_size, width),
                                 _gather(x if s is None else s, rows, blocks).unflatten(0, (n, h))], dim=3)
                      for x, s in ((key, side_keys), (value, side_values)))
    queries = query[:, :, g:].contiguous().unflatten(2, (-1, block_size))
    scores = queries @ keys_.transpose(-1, -2) + _cat_masks(local_scores, side_scores)
    token_rows = scores.softmax(dim=-1) @ values_
    return torch.cat([global_rows, token_rows.flatten(2, 3)], dim=2)


def _stacked_windows(x: torch.Tensor, g: int, block_size: int, width: int) -> torch.Tensor:
    """`_windows` without strided views, for exporters: (batch, heads, G + T, d) -> (batch, heads, B, width, d), block
    i's window tokens (i-1)*bs .. (i-1)*bs + width, as width / bs shifted slices of the zero-padded token blocks."""
    padded = F.pad(x[:, :, g:], (0, 0, block_size, block_size)).unflatten(2, (-1, block_size))
    blocks = padded.shape[2] - 2
    return torch.cat([padded[:, :, s:s + blocks] for s in range(width // block_size)], dim=3)


def _local_bias(bias: RelativeBias, block_size: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, heads, 1, bs, width) bias of the local window, the same for every block: window column c of block i is
    token (i-1)*bs + c, so its key - query distance from row r is c - bs - r."""
    rows = torch.arange(block_size, device=bias.table.device)[:, None]
    distance = torch.arange(width, device=bias.table.device) - block_size - rows
    return bias.same_for_heads(distance, 2 * block_size, dtype)[None, :, None]


def _side_bias(bias: RelativeBias, rows: torch.Tensor, layout: AttentionLayout, blocks: int, causal: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """(batch or 1, heads, B or 1, bs or 1, Ks) bias of the side keys from their source rows (see `_side_sources`).

    A side key's position is its token for token sources (position types, norm), and item j's position j * sf for
    computed items (pooling, bos_pooling, lsh); the G global columns in front get 0. Keys that do not exist point
    at source 0 and are masked, so their bias does not matter (their distances may exceed the T tokens' and are
    clamped). When the buckets cannot tell the side keys' distances apart (`_bias_by_direction`) the bias is one
    value per head and direction, and nothing of size B * bs * Ks is built.
    """
    # under export the block count is symbolic and the bucket check below would read data: the general bias is exact
    by_direction = None if exporting() else _bias_by_direction(bias, layout, blocks, causal, dtype)
    if by_direction is not None:
        return by_direction
    g, bs = layout.num_global_tokens, layout.block_size
    kind = sparse_kind(layout)
    positions = rows - g
    if kind in ITEM_KINDS and kind != "norm":  # rows address [globals; items]
        positions = positions * layout.sparsity_factor
    positions = positions.unflatten(-1, (blocks, -1))
    queries = torch.arange(blocks * bs, device=rows.device).view(blocks, bs)
    distance = positions[..., None, :] - queries[..., None]  # (batch or 1, heads or 1, B, bs, Ks)
    limit = blocks * bs
    if distance.shape[1] == 1:
        values = bias.same_for_heads(distance[:, 0], limit, dtype).movedim(0, 1)
    else:
        values = bias.per_head(distance, limit, dtype)
    is_global = torch.arange(distance.shape[-1], device=rows.device) < g
    return values.masked_fill(is_global, 0)


def _bias_by_direction(bias: RelativeBias, layout: AttentionLayout, blocks: int, causal: bool, dtype: torch.dtype
                       ) -> torch.Tensor | None:
    """(1, heads, 1, 1, Ks) side bias [0 for the globals | the before window's | the after window's], when it is
    exact: every sparse key lies more than block_size from every query of its block and every such distance of
    one direction falls in one bucket; None otherwise.

    The sparse windows lie outside the local window (sparse items of block b come from token block b, and the
    windows start two blocks away), except for an odd sparse step, whose after window is shifted into it. With
    T5's defaults (32 buckets, max distance 128) every block_size >= 90 qualifies: the side bias is then two
    values per head, for any sparsity type. The buckets are checked on the CPU over every distance that can occur.
    """
    g, bs, sbs, heads = layout.num_global_tokens, layout.block_size, layout.sparse_block_size, bias.num_heads
    windows = (1 if causal else 2) if layout.has_sparse_keys else 0
    if windows and sparse_step(layout) % 2:
        return None
    parts = [torch.zeros(heads, g, dtype=dtype, device=bias.table.device)]
    if windows:
        distances = torch.arange(bs + 1, blocks * bs + 1)  # the block path has at least three blocks
        for sign in (-1, 1)[:windows]:
            buckets = bias.bucket(sign * distances)
            if bool((buckets != buckets[0]).any()):
                return None
            parts.append(bias.table[int(buckets[0])].to(dtype)[:, None].expand(heads, sbs))
    return torch.cat(parts, dim=1)[None, :, None, None]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as an additive one. Masked scores get the dtype's lowest finite value rather than -inf: a row
    with no key left in one part then gets a finite logsumexp that gives it weight 0 in the merge (the kernel
    reports 0 for an all -inf row)."""
    added = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return added.masked_fill_(~allowed, torch.finfo(dtype).min)


def _folded(mask: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(batch, 1 or heads, ...) mask of a call whose batch folds (batch * heads): broadcastable, not copied
    where batch is 1."""
    if batch == 1:
        return mask.flatten(0, 1)
    return mask.expand(batch, heads, *mask.shape[2:]).flatten(0, 1)


def _cat_masks(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two additive masks side by side along the key dimension, broadcast to a common shape first."""
    shape = torch.broadcast_shapes(first.shape[:-1], second.shape[:-1])
    return torch.cat([first.expand(*shape, -1), second.expand(*shape, -1)], dim=-1)


def _causal_pattern(block_size: int, width: int, device: torch.device) -> torch.Tensor:
    """(block_size, width) bool: the previous block, and the current block's keys up to the query."""
    rows = torch.arange(block_size, device=device)[:, None]
    return torch.arange(width, device=device) <= rows + width - block_size
