"""Attention dropout as a pure function of (seed, batch row, head, query row, key), so any blocking regenerates it.

A call draws one 32-bit seed from torch's default generator (`draw_seed`: `torch.manual_seed` makes training
reproducible, and gradient checkpointing, which restores that generator, redraws the same seed). The dropout
of probability p then keeps the score of query row q and key `id` in head h of batch row b iff

    u(seed, b, h, q, id) >= floor(p * 2**32)          (kept probabilities are scaled by 1 / (1 - p))

with, in unsigned 32-bit arithmetic (every product and sum mod 2**32; >> is a logical shift),

    mix(x)      = murmur3's fmix32: x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    row(s,b,h,q)= mix(mix(mix(mix(s) ^ b) ^ h) ^ q)
    key(id)     = mix(id ^ 0x9E3779B9)
    u           = final(row ^ key) ^ 0x80000000,  final(x) = x *= 0x85EBCA6B; x ^= x >> 16; x *= 0xC2B2AE35

(`final` mixes every bit of its input into the top bits, the ones the comparison reads; flipping the top bit
makes the unsigned comparison one signed int32 comparison.)

Query rows count the G global queries first (q = 0 .. G + T - 1). A key's identity `id` is its row in
[G globals | T tokens | S sparse items]: global j is j, token p is G + p, sparse item j is G + T + j (for every
sparsity type, the position types included: the item index, not the token it is taken from). Within one query
row every key has its own identity, so a key that occurs twice in a key set (a token in the local window and
as a sparse item of the odd-step after window) is dropped independently in each place, as two keys are.

Only the row and key codes are hashed in full (tensors as long as the sequence); the per-score work is the
cheaper `final`, six int32 tensor passes (wrapping two's-complement products give the same bits as the unsigned
definition), so the mask never depends on the thread count, the blocking or the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import AttentionLayout
from .masks import sparse_windows
from .sparse import sparse_kind

_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
_KEY_SALT = 0x9E3779B9


def _signed(value: int) -> int:
    """An unsigned 32-bit constant as the int32 with the same bits."""
    return value - (1 << 32) if value >= 1 << 31 else value


def draw_seed() -> int:
    """One 32-bit seed from torch's default generator (advances it, as torch's own dropout does)."""
    return int(torch.randint(0, 1 << 32, (), dtype=torch.int64))


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """fmix32 of int64 tensors holding unsigned 32-bit values (the small tensors of row and key codes)."""
    mask = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * _M1) & mask
    x = x ^ (x >> 13)
    x = (x * _M2) & mask
    return x ^ (x >> 16)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def row_codes(seed: int, batch: int, heads: int, rows: int, device: torch.device) -> torch.Tensor:
    """(batch, heads, rows) int32: row(seed, b, h, q) of every query row."""
    b = torch.arange(batch, device=device, dtype=torch.int64)[:, None, None]
    h = torch.arange(heads, device=device, dtype=torch.int64)[:, None]
    q = torch.arange(rows, device=device, dtype=torch.int64)
    start = _mix64(torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64, device=device))
    return _to_int32(_mix64(_mix64(_mix64(start ^ b) ^ h) ^ q))


def key_codes(ids: torch.Tensor) -> torch.Tensor:
    """key(id) of key identities (any shape, non-negative integers), as int32."""
    return _to_int32(_mix64(ids.to(torch.int64) ^ _KEY_SALT))


def keep_mask(rows: torch.Tensor, keys: torch.Tensor, p: float, out: torch.Tensor | None = None,
              work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Keep-mask of row codes (..., r, 1) against key codes (..., 1, K), broadcast: u >= floor(p * 2**32).

    Bool, or written into `out` (any dtype: 0 / 1); work: two int32 buffers of the broadcast shape to reuse (a
    blocked caller's chunks then allocate nothing). The logical shift is an arithmetic one with the sign bits
    masked off, and u >= U is the signed comparison final >= U - 2**31 (u is final with its top bit flipped).
    """
    if work is None:
        shape = torch.broadcast_shapes(rows.shape, keys.shape)
        work = (torch.empty(shape, dtype=torch.int32, device=rows.device),
                torch.empty(shape, dtype=torch.int32, device=rows.device))
    x, shifted = work
    torch.bitwise_xor(rows, keys, out=x)
    x.mul_(_signed(_M1))
    torch.bitwise_right_shift(x, 16, out=shifted)
    x.bitwise_xor_(shifted.bitwise_and_(0xFFFF))
    x.mul_(_signed(_M2))
    return torch.ge(x, threshold(p) - (1 << 31), out=out) if out is not None else x >= threshold(p) - (1 << 31)


def threshold(p: float) -> int:
    """floor(p * 2**32): hashes below it are dropped."""
    return int(p * (1 << 32))


def check_probability(p: float) -> None:
    """Dropout probabilities must lie in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")


@dataclass(frozen=True)
class DropoutCodes:
    """What the blocked product needs to regenerate one call's keep-masks: p, the row codes (batch, heads, G + T)
    and the key codes of the local windows (B, width), of the side keys (B, Ks) and of all G + T keys (global
    queries). O(length) integers; the (rows x keys) masks themselves are never stored."""

    p: float
    rows: torch.Tensor
    local: torch.Tensor
    side: torch.Tensor
    full: torch.Tensor


def dropout_codes(p: float, seed: int, batch: int, heads: int, layout: AttentionLayout, num_tokens: int,
                  width: int, causal: bool, device: torch.device) -> DropoutCodes:
    """The codes of one call: local window column c of block i is token (i-1)*bs + c; the side keys are
    [globals | before window | after window] (causal: no after window), as `masks.prepare_mask` orders them."""
    g, bs, t = layout.num_global_tokens, layout.block_size, num_tokens
    blocks = t // bs
    block = torch.arange(blocks, device=device)[:, None]
    local = (g + (block - 1) * bs + torch.arange(width, device=device)).clamp_min(0)  # < 0: masked, before token 0
    side = torch.arange(g, device=device).expand(blocks, g)
    if sparse_kind(layout) != "none":
        before, after = sparse_windows(layout, blocks, device)
        side = torch.cat([side, g + t + (before if causal else torch.cat([before, after], dim=1))], dim=1)
    return DropoutCodes(p, row_codes(seed, batch, heads, g + t, device), key_codes(local), key_codes(side),
                        key_codes(torch.arange(g + t, device=device)))
