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
