"""LSG block attention as fused Triton kernels (the ``triton`` backend): one program per (batch row and head,
tile of query rows), an online softmax over the block's two key parts, nothing gathered.

* the local window: block i's tokens (i-1)*bs .. (i-1)*bs + width, read in place from the keys and values
  (positions outside the sequence read as zero keys, masked by the local scores, as the blocked kernel pads);
* the side keys: read by row (`Plan.rows`) from their source, the keys themselves (position types, norm) or the
  compact [globals; items] tensor (pooling, bos_pooling, lsh).

The additive local and side scores of the plan (masks, causal pattern, a relative bias) are read with broadcast
strides. The global query rows run through the same kernel in a second launch, their "window" being the first
`Plan.global_keys` keys with the global key mask. The forward writes the output and the logsumexp; the backward
recomputes the probabilities from it (flash-style), writes the query gradient of its rows and adds the key/value
gradients (and the score gradients, when a bias table trains) with atomic adds into float32 (float64) buffers:
the windows overlap and side keys are shared between blocks, so no program owns them. Side gradients land in the side
source's buffer, so autograd carries item gradients back through `sparse_items`.

Attention dropout uses the counter-based keep-mask of `dropout.py` (the same bits: `keep_mask`'s int32
arithmetic, written again in Triton), regenerated in the backward. Grouped-query keys: query head h reads key
head h // group. fp32, fp16 and bf16 inputs (and float64, for tests); scores and accumulators in float32 (float64).

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported), which is how the tests check it without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .dropout import _M1, _M2, DropoutCodes, _signed, threshold
from .plan import Plan

_MIX1, _MIX2 = tl.constexpr(_signed(_M1)), tl.constexpr(_signed(_M2))  # the hash's multipliers, as int32
BLOCK_N = 64  # key columns per step of a part
MAX_BLOCK_M = 64  # query rows per program: larger blocks are split into tiles


@triton.jit
def _keep(row_codes, key_codes, limit):
    """dropout.keep_mask for row codes (M,) against key codes (N,): (M, N) bool."""
    x = row_codes[:, None] ^ key_codes[None, :]
    x = x * _MIX1
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MIX2
    return x >= limit


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot, with bfloat16 operands taken to float32 first under the interpreter (UPCAST), whose tl.dot
    mishandles bfloat16 (numpy has none); compiled kernels multiply bfloat16 directly."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _part_columns(step, blk, b, kh, width, offset, block_step, low, high, ROWS, rows_sb, rows_sh,
                  BY_ROW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column indices (N,) of one step over a part, their key rows and which of them exist: a window part reads
    rows offset + blk * block_step + c (existing within [low, high)), a side part reads ROWS."""
    c = step + tl.arange(0, BLOCK_N)
    in_part = c < width
    if BY_ROW:
        krow = tl.load(ROWS + b * rows_sb + kh * rows_sh + blk * width + c, mask=in_part, other=0)
        exists = in_part
    else:
        krow = offset + blk * block_step + c
        exists = in_part & (krow >= low) & (krow < high)
    return c, in_part, krow, exists


@triton.jit
def _scores(q, k, c, in_part, r, row_ok, b, kh, blk, scale, S, s_sb, s_sh, s_si, s_sr, s_sc,
            HAS_SCORES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Scores (M, N) in the accumulation dtype: q . k * scale + the additive scores; -inf on columns beyond the part."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    if HAS_SCORES:
        added = tl.load(S + b * s_sb + kh * s_sh + blk * s_si + r[:, None] * s_sr + c[None, :] * s_sc,
                        mask=row_ok[:, None] & in_part[None, :], other=0.0)
        s += added.to(ACC)
    return tl.where(in_part[None, :], s, float("-inf"))


@triton.jit
def _forward_part(acc, m, l, q, r, row_ok, dd, d_ok, row_code, b, kh, blk, scale, limit,
                  K, V, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl,
                  width, offset, block_step, low, high, ROWS, rows_sb, rows_sh,
                  S, s_sb, s_sh, s_si, s_sr, s_sc, CODES, c_si, c_sc,
                  BY_ROW: tl.constexpr, HAS_SCORES: tl.constexpr, DROPOUT: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax over one part's keys: updated (acc, m, l); acc holds the kept, unnormalised rows."""
    for step in range(0, width, BLOCK_N):
        c, in_part, krow, exists = _part_columns(step, blk, b, kh, width, offset, block_step, low, high, ROWS,
                                                 rows_sb, rows_sh, BY_ROW, BLOCK_N)
        load = exists[:, None] & d_ok[None, :]
        k = tl.load(K + b * k_sb + kh * k_sh + krow[:, None] * k_sl + dd[None, :], mask=load, other=0.0)
        v = tl.load(V + b * v_sb + kh * v_sh + krow[:, None] * v_sl + dd[None, :], mask=load, other=0.0)
        s = _scores(q, k, c, in_part, r, row_ok, b, kh, blk, scale, S, s_sb, s_sh, s_si, s_sr, s_sc,
                    HAS_SCORES, PRECISION, UPCAST, ACC)
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        if DROPOUT:
            codes = tl.load(CODES + blk * c_si + c * c_sc, mask=in_part, other=0)
            p = tl.where(_keep(row_code, codes, limit), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m = m_new
    return acc, m, l


@triton.jit
def _backward_part(dq, q, do, delta, lse, r, row_ok, dd, d_ok, row_code, b, kh, blk, scale, limit, keep_scale,
                   K, V, DK, DV, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, dk_sb, dk_sh, dk_sl,
                   width, offset, block_step, low, high, ROWS, rows_sb, rows_sh,
                   S, s_sb, s_sh, s_si, s_sr, s_sc, CODES, c_si, c_sc,
                   DS, ds_sb, ds_sh, ds_si, ds_sr, ds_sc,
                   BY_ROW: tl.constexpr, HAS_SCORES: tl.constexpr, DROPOUT: tl.constexpr, NEED_DS: tl.constexpr,
                   DS_ROW_SUM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """One part's share of the backward: returns the updated query gradient (unscaled) and adds the key, value
    (and score) gradients of its keys to their float32 buffers."""
    for step in range(0, width, BLOCK_N):
        c, in_part, krow, exists = _part_columns(step, blk, b, kh, width, offset, block_step, low, high, ROWS,
                                                 rows_sb, rows_sh, BY_ROW, BLOCK_N)
        load = exists[:, None] & d_ok[None, :]
        k = tl.load(K + b * k_sb + kh * k_sh + krow[:, None] * k_sl + dd[None, :], mask=load, other=0.0)
        v = tl.load(V + b * v_sb + kh * v_sh + krow[:, None] * v_sl + dd[None, :], mask=load, other=0.0)
        s = _scores(q, k, c, in_part, r, row_ok, b, kh, blk, scale, S, s_sb, s_sh, s_si, s_sr, s_sc,
                    HAS_SCORES, PRECISION, UPCAST, ACC)
        p = tl.exp(s - lse[:, None])
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        if DROPOUT:
            codes = tl.load(CODES + blk * c_si + c * c_sc, mask=in_part, other=0)
            keep = _keep(row_code, codes, limit)
            kept = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            kept = p
        ds = tl.where(row_ok[:, None] & in_part[None, :], p * (dp - delta[:, None]), 0.0)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST) * scale
        dv = _dot(tl.trans(kept.to(do.dtype)), do, PRECISION, UPCAST)
        target = b * dk_sb + kh * dk_sh + krow[:, None] * dk_sl + dd[None, :]
        tl.atomic_add(DK + target, dk, mask=load)
        tl.atomic_add(DV + target, dv, mask=load)
        if NEED_DS:
            base = DS + b * ds_sb + kh * ds_sh + blk * ds_si
            if DS_ROW_SUM:  # the scores are shared by the block's rows: one sum per column
                tl.atomic_add(base + c * ds_sc, tl.sum(ds, 0), mask=in_part)
            else:
                tl.atomic_add(base + r[:, None] * ds_sr + c[None, :] * ds_sc, ds,
                              mask=row_ok[:, None] & in_part[None, :])
    return dq


@triton.jit
def _forward_kernel(Q, OUT, LSE, ROW_CODES, q_sb, q_sh, q_sl, o_sb, o_sh, o_sl, rc_sb, rc_sh,
                    heads, group, length, row0, rows_per_block, tiles, d, scale, limit, keep_scale,
                    K, V, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl,
                    A_WIDTH, A_OFFSET, A_STEP, A_LOW, A_HIGH,
                    A_S, a_sb, a_sh, a_si, a_sr, a_sc, A_CODES, ac_si, ac_sc,
                    SK, SV, sk_sb, sk_sh, sk_sl, sv_sb, sv_sh, sv_sl, B_WIDTH, ROWS, rows_sb, rows_sh,
                    B_S, b_sb, b_sh, b_si, b_sr, b_sc, B_CODES, bc_si, bc_sc,
                    A_SCORES: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of one (batch row, head) tile: part A (a window) then part B (side keys by row)."""
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    kh = h // group
    blk = tile // tiles
    r = (tile % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows_per_block
    qrow = row0 + blk * rows_per_block + r
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < d
    rows2 = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * q_sb + h * q_sh + qrow[:, None] * q_sl + dd[None, :], mask=rows2, other=0.0)
    row_code = 0
    if DROPOUT:
        row_code = tl.load(ROW_CODES + b * rc_sb + h * rc_sh + qrow, mask=row_ok, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    acc, m, l = _forward_part(acc, m, l, q, r, row_ok, dd, d_ok, row_code, b, kh, blk, scale, limit,
                              K, V, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl,
                              A_WIDTH, A_OFFSET, A_STEP, A_LOW, A_HIGH, ROWS, rows_sb, rows_sh,
                              A_S, a_sb, a_sh, a_si, a_sr, a_sc, A_CODES, ac_si, ac_sc,
                              False, A_SCORES, DROPOUT, PRECISION, UPCAST, ACC, BLOCK_N)
    acc, m, l = _forward_part(acc, m, l, q, r, row_ok, dd, d_ok, row_code, b, kh, blk, scale, limit,
                              SK, SV, sk_sb, sk_sh, sk_sl, sv_sb, sv_sh, sv_sl,
                              B_WIDTH, 0, 0, 0, 0, ROWS, rows_sb, rows_sh,
                              B_S, b_sb, b_sh, b_si, b_sr, b_sc, B_CODES, bc_si, bc_sc,
                              True, True, DROPOUT, PRECISION, UPCAST, ACC, BLOCK_N)
    out = acc / l[:, None] * keep_scale
    tl.store(OUT + b * o_sb + h * o_sh + qrow[:, None] * o_sl + dd[None, :], out.to(OUT.dtype.element_ty), mask=rows2)
    tl.store(LSE + bh * length + qrow, m + tl.log(l), mask=row_ok)


@triton.jit
def _backward_kernel(Q, OUT, DO, DQ, LSE, ROW_CODES, q_sb, q_sh, q_sl, o_sb, o_sh, o_sl, do_sb, do_sh, do_sl,
                     dq_sb, dq_sh, dq_sl, rc_sb, rc_sh,
                     heads, group, length, row0, rows_per_block, tiles, d, scale, limit, keep_scale,
                     K, V, DK, DV, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, dk_sb, dk_sh, dk_sl,
                     A_WIDTH, A_OFFSET, A_STEP, A_LOW, A_HIGH,
                     A_S, a_sb, a_sh, a_si, a_sr, a_sc, A_CODES, ac_si, ac_sc,
                     A_DS, ads_sb, ads_sh, ads_si, ads_sr, ads_sc,
                     SK, SV, DSK, DSV, sk_sb, sk_sh, sk_sl, sv_sb, sv_sh, sv_sl, dsk_sb, dsk_sh, dsk_sl,
                     B_WIDTH, ROWS, rows_sb, rows_sh,
                     B_S, b_sb, b_sh, b_si, b_sr, b_sc, B_CODES, bc_si, bc_sc,
                     B_DS, bds_sb, bds_sh, bds_si, bds_sr, bds_sc,
                     A_SCORES: tl.constexpr, DROPOUT: tl.constexpr, NEED_A_DS: tl.constexpr,
                     A_ROW_SUM: tl.constexpr, NEED_B_DS: tl.constexpr, B_ROW_SUM: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The backward of `_forward_kernel`'s tile, from its saved logsumexp."""
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    kh = h // group
    blk = tile // tiles
    r = (tile % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows_per_block
    qrow = row0 + blk * rows_per_block + r
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < d
    rows2 = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * q_sb + h * q_sh + qrow[:, None] * q_sl + dd[None, :], mask=rows2, other=0.0)
    do = tl.load(DO + b * do_sb + h * do_sh + qrow[:, None] * do_sl + dd[None, :], mask=rows2, other=0.0)
    o = tl.load(OUT + b * o_sb + h * o_sh + qrow[:, None] * o_sl + dd[None, :], mask=rows2, other=0.0)
    delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
    lse = tl.load(LSE + bh * length + qrow, mask=row_ok, other=float("inf"))
    row_code = 0
    if DROPOUT:
        row_code = tl.load(ROW_CODES + b * rc_sb + h * rc_sh + qrow, mask=row_ok, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dq = _backward_part(dq, q, do, delta, lse, r, row_ok, dd, d_ok, row_code, b, kh, blk, scale, limit, keep_scale,
                        K, V, DK, DV, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, dk_sb, dk_sh, dk_sl,
                        A_WIDTH, A_OFFSET, A_STEP, A_LOW, A_HIGH, ROWS, rows_sb, rows_sh,
                        A_S, a_sb, a_sh, a_si, a_sr, a_sc, A_CODES, ac_si, ac_sc,
                        A_DS, ads_sb, ads_sh, ads_si, ads_sr, ads_sc,
                        False, A_SCORES, DROPOUT, NEED_A_DS, A_ROW_SUM, PRECISION, UPCAST, ACC, BLOCK_N)
    dq = _backward_part(dq, q, do, delta, lse, r, row_ok, dd, d_ok, row_code, b, kh, blk, scale, limit, keep_scale,
                        SK, SV, DSK, DSV, sk_sb, sk_sh, sk_sl, sv_sb, sv_sh, sv_sl, dsk_sb, dsk_sh, dsk_sl,
                        B_WIDTH, 0, 0, 0, 0, ROWS, rows_sb, rows_sh,
                        B_S, b_sb, b_sh, b_si, b_sr, b_sc, B_CODES, bc_si, bc_sc,
                        B_DS, bds_sb, bds_sh, bds_si, bds_sr, bds_sc,
                        True, True, DROPOUT, NEED_B_DS, B_ROW_SUM, PRECISION, UPCAST, ACC, BLOCK_N)
    tl.store(DQ + b * dq_sb + h * dq_sh + qrow[:, None] * dq_sl + dd[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=rows2)


class TritonAttention(torch.autograd.Function):
    """LSG attention (batch, heads, G + T, d) through the Triton kernels, returned laid out as (batch, G + T,
    heads, d) (merging the heads afterwards is free); the arguments are `blocked.BlockedAttention`'s: the side
    source (None: key / value themselves), the additive local and side scores of the plan (their gradients are
    returned when they require one), the plan and the dropout codes (None: no dropout)."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                side_keys: torch.Tensor | None, side_values: torch.Tensor | None, local_scores: torch.Tensor,
                side_scores: torch.Tensor, plan: Plan, codes: DropoutCodes | None) -> torch.Tensor:
        query, key, value, side_keys, side_values = (
            None if x is None else _unit_last_stride(x) for x in (query, key, value, side_keys, side_values))
        n, h, length, d = query.shape
        out = torch.empty(n, length, h, d, dtype=query.dtype, device=query.device).transpose(1, 2)
        lse = torch.empty(n * h, length, dtype=_accumulation(query.dtype), device=query.device)
        for programs in _programs(query, key, value, side_keys, side_values, local_scores, side_scores, plan, codes):
            _forward_kernel[programs.grid](
                query, out, lse, programs.row_codes, *_strides(query), *_strides(out), *programs.row_code_strides,
                *programs.shape, *programs.dropout, *programs.a_sources, *programs.a_strides, *programs.a_rest,
                *programs.b_sources, *programs.b_strides, *programs.b_rest, **programs.constants, num_warps=4)
        ctx.save_for_backward(query, key, value, side_keys, side_values, local_scores, side_scores, out, lse)
        ctx.plan, ctx.codes = plan, codes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, side_keys, side_values, local_scores, side_scores, out, lse = ctx.saved_tensors
        plan, codes = ctx.plan, ctx.codes
        grad_out = _unit_last_stride(grad_out)
        dquery = torch.empty_like(query)  # every row is written by exactly one program
        acc = _accumulation(query.dtype)
        dkey, dvalue = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (key, value))
        dside_keys, dside_values = (
            full if source is None else torch.zeros(source.shape, dtype=acc, device=source.device)
            for source, full in ((side_keys, dkey), (side_values, dvalue)))
        dlocal, dside = (torch.zeros(s.shape, dtype=acc, device=s.device) if need else None
                         for s, need in zip((local_scores, side_scores), ctx.needs_input_grad[5:7]))
        key_heads = key.shape[1]
        for programs in _programs(query, key, value, side_keys, side_values, local_scores, side_scores, plan, codes):
            a_grads = dlocal if programs.is_tokens else None
            b_grads = dside if programs.is_tokens else None
            _backward_kernel[programs.grid](
                query, out, grad_out, dquery, lse, programs.row_codes, *_strides(query), *_strides(out),
                *_strides(grad_out), *_strides(dquery), *programs.row_code_strides,
                *programs.shape, *programs.dropout,
                *programs.a_sources, dkey, dvalue, *programs.a_strides, *_strides(dkey), *programs.a_rest,
                *_score_grad_args(a_grads, query, key_heads),
                *programs.b_sources, dside_keys, dside_values, *programs.b_strides, *_strides(dside_keys),
                *programs.b_rest, *_score_grad_args(b_grads, query, key_heads),
                NEED_A_DS=a_grads is not None, A_ROW_SUM=a_grads is not None and a_grads.shape[2] == 1,
                NEED_B_DS=b_grads is not None, B_ROW_SUM=b_grads is not None and b_grads.shape[2] == 1,
                **programs.constants, num_warps=4)
        if side_keys is not None:
            dside_keys, dside_values = dside_keys.to(side_keys.dtype), dside_values.to(side_values.dtype)
        else:
            dside_keys = dside_values = None
        return (dquery, dkey.to(key.dtype), dvalue.to(value.dtype), dside_keys, dside_values,
                None if dlocal is None else dlocal.to(local_scores.dtype),
                None if dside is None else dside.to(side_scores.dtype), None, None)


@dataclass(frozen=True)
class _Programs:
    """One launch's grid and the kernel arguments both directions share, in the kernels' order: the query rows
    (token blocks or the global rows), the dropout, part A (a window of keys) and part B (side keys by row), each
    part as its key/value sources, their strides and the rest (which keys, additive scores, dropout codes); the
    backward puts its gradient buffers after the sources and their strides after the sources' strides."""

    grid: tuple[int, int]
    is_tokens: bool
    row_codes: torch.Tensor
    row_code_strides: tuple[int, int]
    shape: tuple[int | float, ...]
    dropout: tuple[int | float, ...]
    a_sources: tuple[torch.Tensor, torch.Tensor]
    a_strides: tuple[int, ...]
    a_rest: tuple[Any, ...]
    b_sources: tuple[torch.Tensor, torch.Tensor]
    b_strides: tuple[int, ...]
    b_rest: tuple[Any, ...]
    constants: dict[str, Any]


def _programs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, side_keys: torch.Tensor | None,
              side_values: torch.Tensor | None, local_scores: torch.Tensor, side_scores: torch.Tensor, plan: Plan,
              codes: DropoutCodes | None) -> list[_Programs]:
    """The launches of one call: the token blocks (window: the local window; side keys: by plan.rows) and, when
    there are global tokens, the global rows (window: the first plan.global_keys keys; no side keys)."""
    n, h, length, d = query.shape
    key_heads = key.shape[1]
    g, bs = plan.num_global, plan.block_size
    blocks, keys = (length - g) // bs, plan.global_keys(length)
    side_k = key if side_keys is None else side_keys
    side_v = value if side_values is None else side_values
    rows = plan.rows if plan.rows.stride(-1) == 1 else plan.rows.contiguous()
    rows_strides = tuple(s if size > 1 else 0 for size, s in zip(rows.shape[:2], rows.stride()[:2]))
    row_codes = query if codes is None else codes.rows
    row_code_strides = (0, 0) if codes is None else tuple(
        s if size > 1 else 0 for size, s in zip(codes.rows.shape[:2], codes.rows.stride()[:2]))
    dropout = (0, 1.0) if codes is None else (threshold(codes.p) - (1 << 31), 1 / (1 - codes.p))
    window = ((key, value), (*_strides(key), *_strides(value)))
    side = ((side_k, side_v), (*_strides(side_k), *_strides(side_v)))
    side_codes = (query, 0, 0) if codes is None else (codes.side, *codes.side.stride())

    def side_rest(width: int) -> tuple[Any, ...]:
        return (width, rows, *rows_strides, side_scores, *_score_strides(side_scores, key_heads), *side_codes)

    constants = dict(DROPOUT=codes is not None, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
                     PRECISION="ieee" if query.dtype == torch.float32 else None,  # fp32: no tf32
                     UPCAST=query.dtype == torch.bfloat16 and query.device.type == "cpu",
                     ACC=tl.float64 if query.dtype == torch.float64 else tl.float32)
    launches = []
    block_m = _rows_per_program(bs)
    tiles = triton.cdiv(bs, block_m)
    local_codes = (query, 0, 0) if codes is None else (codes.local, *codes.local.stride())
    launches.append(_Programs(
        (n * h, blocks * tiles), True, row_codes, row_code_strides,
        (h, h // key_heads, length, g, bs, tiles, d, plan.scale), dropout,
        *window, (plan.width, g - bs, bs, g, length, local_scores, *_score_strides(local_scores, key_heads),
                  *local_codes),
        *side, side_rest(side_scores.shape[-1]), dict(constants, A_SCORES=True, BLOCK_M=block_m)))
    if g:
        block_m = _rows_per_program(g)
        mask = plan.global_mask
        mask_args = ((query, 0, 0, 0, 0, 0) if mask is None else
                     (mask, mask.stride(0) if mask.shape[0] > 1 else 0, 0, 0, 0, mask.stride(-1)))
        full_codes = (query, 0, 0) if codes is None else (codes.full, 0, codes.full.stride(0))
        launches.append(_Programs(
            (n * h, triton.cdiv(g, block_m)), False, row_codes, row_code_strides,
            (h, h // key_heads, length, 0, g, triton.cdiv(g, block_m), d, plan.scale), dropout,
            *window, (keys, 0, 0, 0, keys, *mask_args, *full_codes), *side, side_rest(0),
            dict(constants, A_SCORES=mask is not None, BLOCK_M=block_m)))
    return launches


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scores, accumulators and gradient buffers: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_program(rows: int) -> int:
    """BLOCK_M for blocks of `rows` query rows: a power of two of at least 16 (tl.dot's minimum), at most
    MAX_BLOCK_M (larger blocks are split into tiles)."""
    return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and row strides of a (batch, heads, L, d) tensor (0 along a dimension of size 1)."""
    return tuple(s if size > 1 else 0 for size, s in zip(x.shape[:3], x.stride()[:3]))


def _score_strides(scores: torch.Tensor, key_heads: int) -> tuple[int, int, int, int, int]:
    """Batch, key head, block, row and column strides of additive scores (batch * key heads or 1, B or 1,
    rows or 1, keys), 0 along what they broadcast over."""
    s0, s1, s2, s3 = scores.stride()
    folded = scores.shape[0] > 1
    return (key_heads * s0 if folded else 0, s0 if folded else 0, s1 if scores.shape[1] > 1 else 0,
            s2 if scores.shape[2] > 1 else 0, s3)


def _score_grad_args(grads: torch.Tensor | None, query: torch.Tensor, key_heads: int) -> tuple[Any, ...]:
    """The kernel's arguments for a score gradient buffer (a placeholder pointer when none is wanted)."""
    return (query, 0, 0, 0, 0, 0) if grads is None else (grads, *_score_strides(grads, key_heads))


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x with its d elements adjacent (the kernels address rows with a unit last stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()
