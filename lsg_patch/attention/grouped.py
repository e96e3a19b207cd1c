"""LSG's full-attention path (inputs of at most two blocks) for grouped-query attention, without repeated keys.

Llama, Mistral, Qwen2 and EuroBERT give fewer key/value heads than query heads. On the block path `lsg_attention`
shares them itself where it can (`product._shares_key_heads`); on the full-attention path, without dropout, one
`scaled_dot_product_attention(..., enable_gqa=True)` call shares each key head with its query heads, with the same
key set as `lsg_attention` there: every key of [globals; tokens], padding masked; causal: a global query sees the
globals, a token query the globals and the tokens up to itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import LSGMask


def grouped_full_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask,
                           num_global_tokens: int, *, causal: bool = False, dropout_p: float = 0.0,
                           scale: float | None = None) -> torch.Tensor:
    """Full attention of (batch, heads, G + T, d) queries over (batch, kv_heads, G + T, d) keys and values, kv_heads
    dividing heads; mask: the call's LSGMask, on the full-attention path (mask.index is None). Same shape out."""
    if mask.index is not None:
        raise ValueError(f"{mask.num_tokens} tokens take LSG's block path, not the full-attention path")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key heads (it must divide them)")
    attn_mask = mask.full if mask.any_masked else None
    if causal:
        length, g = key.shape[-2], num_global_tokens
        rows = torch.arange(length, device=key.device)[:, None]
        columns = torch.arange(length, device=key.device)
        pattern = (columns < g) | ((rows >= g) & (columns <= rows))
        attn_mask = pattern if attn_mask is None else attn_mask & pattern
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=True)
