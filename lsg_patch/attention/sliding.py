"""Bidirectional sliding-window attention in memory and time linear in the sequence length.

A query at position p attends to the keys at positions p - window .. p + window that the key mask allows
(transformers' `sliding_window_bidirectional_overlay`: |q - k| <= window). Built densely, that is an (n, n) mask
and an (n, n) score matrix per head. Here the queries are cut into chunks of `chunk = max(window, 1)` rows;
chunk i can only see positions i*chunk - window .. (i+1)*chunk - 1 + window, `chunk + 2 * window` keys (three
chunks), taken as a strided view (unfold) of the keys padded with `window` zero rows on each side. One
`scaled_dot_product_attention` call runs all chunks as a batch, with the exact band inside each window and the
key mask, so memory and work grow with n * (chunk + 2 * window), never with n * n. Public torch ops only: it runs
on every device, with dropout and autograd.

A query that sees no allowed key at all (a padded position with only padding within its window) gets zeros, as
torch's own SDPA gives such rows on the CPU; it is made explicit here so that no device returns NaN, which the
next layer's values would spread.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import exporting


def sliding_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
                             window: int, *, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Attention of queries (batch, heads, n, d) over keys and values (batch, kv_heads, n, d) within `window`
    positions on each side; key_mask (batch, n) bool, True = may be attended. Returns (batch, heads, n, d).

    kv_heads may divide heads (grouped-query attention): the key heads are shared by SDPA, never repeated.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window={window!r} is not accepted: it must be an integer >= 0 (keys seen on each side)")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if key.shape[-2] != length or value.shape[-2] != length:
        raise ValueError(f"sliding-window attention needs as many keys as queries; got {length} queries and "
                         f"{key.shape[-2]} keys")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key heads (it must divide the query heads)")
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (batch, length):
        raise ValueError(f"key_mask must be a ({batch}, {length}) bool tensor, got {key_mask.dtype} with shape "
                         f"{tuple(key_mask.shape)}")
    chunk = max(window, 1)
    if exporting():
        return _exportable_sliding(query, key, value, key_mask, window, chunk, scale)
    blocks = -(-length // chunk)
    span = chunk + 2 * window
    tail = blocks * chunk - length

    def windows(tensor: torch.Tensor) -> torch.Tensor:
        """(batch * blocks, heads, span, d): the keys each query chunk can see."""
        padded = F.pad(tensor, (0, 0, window, tail + window)).unfold(2, span, chunk)  # (batch, h, blocks, d, span)
        return padded.permute(0, 2, 1, 4, 3).reshape(batch * blocks, tensor.shape[1], span, dim)

    queries = F.pad(query, (0, 0, 0, tail)).unflatten(2, (blocks, chunk)).transpose(1, 2)
    queries = queries.reshape(batch * blocks, heads, chunk, dim)
    allowed = F.pad(key_mask, (window, tail + window), value=False).unfold(1, span, chunk)  # (batch, blocks, span)
    rows = torch.arange(chunk, device=query.device)[:, None]
    columns = torch.arange(span, device=query.device)
    band = (columns >= rows) & (columns <= rows + 2 * window)  # |query - key| <= window inside the window
    mask = allowed[:, :, None, :] & band  # (batch, blocks, chunk, span)
    seen = mask.any(-1, keepdim=True)
    mask = (mask | ~seen).reshape(batch * blocks, 1, chunk, span)  # rows seeing nothing: any finite row, zeroed below
    output = F.scaled_dot_product_attention(queries, windows(key), windows(value), attn_mask=mask,
                                            dropout_p=dropout_p, scale=scale, enable_gqa=kv_heads != heads)
    output = output.unflatten(0, (batch, blocks)).masked_fill(~seen[:, :, None], 0)  # (batch, blocks, h, chunk, d)
    return output.transpose(2, 3).reshape(batch, blocks * chunk, heads, dim)[:, :length].transpose(1, 2)


def _exportable_sliding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
                        window: int, chunk: int, scale: float | None) -> torch.Tensor:
    """The same attention as torch.export traces it (inference, no dropout): the zero padding written by index_copy
    into whole chunks, the windows as span / chunk shifted slices of the chunks rather than a strided view, explicit
    scores (batch, heads, blocks, chunk, span); keys repeated to the query heads."""
    batch, heads, length, dim = query.shape
    scale = dim ** -0.5 if scale is None else scale
    pieces = 3 if window else 1  # span = chunk + 2 * window: 3 chunks (chunk = window), or 1 (window 0)
    key, value = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (key, value))
    blocks = (length + chunk - 1) // chunk
    positions = torch.arange(length, device=query.device)

    def stacked(x: torch.Tensor, dim: int) -> torch.Tensor:
        """x placed after `window` zero rows in whole chunks along dim, then block i's span rows next to each other."""
        shape = (*x.shape[:dim], (blocks + pieces - 1) * chunk, *x.shape[dim + 1:])
        chunks = x.new_zeros(shape).index_copy(dim, positions + window, x).unflatten(dim, (-1, chunk))
        count = chunks.shape[dim] - (pieces - 1)
        return torch.cat([chunks.narrow(dim, s, count) for s in range(pieces)], dim=dim + 1)

    queries = query.new_zeros(batch, heads, blocks * chunk, dim).index_copy(2, positions, query).unflatten(2, (-1, chunk))
    rows = torch.arange(chunk, device=query.device)[:, None]
    columns = torch.arange(chunk * pieces, device=query.device)
    band = (columns >= rows) & (columns <= rows + 2 * window)
    mask = stacked(key_mask, 1)[:, :, None, :] & band  # (batch, blocks, chunk, span)
    seen = mask.any(-1, keepdim=True)
    scores = queries @ stacked(key, 2).transpose(-1, -2) * scale
    scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
    output = (scores.softmax(dim=-1) @ stacked(value, 2)).masked_fill(~seen[:, None], 0)
    return output.flatten(2, 3).index_select(2, positions)
