"""The "lsg_sliding" attention implementation: the sliding-window layers of a converted model (ModernBERT's local
layers) over [globals; tokens; padding], in memory linear in the length.

Those layers do not run LSG; they keep their windowed attention (a key within `config.sliding_window` positions
of the query, padding masked, the G global tokens being the first G positions), computed banded per chunk of
queries (`attention.sliding`) instead of through transformers' dense (n, n) windowed mask. The key mask comes
from the per-call state, as for the LSG layers; the `attention_mask` argument is not used (the stack passes none).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.sliding import sliding_window_attention
from .call import CALL_KEYWORD, LSGCall

SLIDING_ATTENTION_NAME = "lsg_sliding"


def sliding_attention_function(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Bidirectional sliding-window attention of one converted module; (batch, n, heads, d) out, no weights."""
    call = kwargs.get(CALL_KEYWORD)
    if not isinstance(call, LSGCall):
        raise RuntimeError(
            f"{type(module).__name__} runs lsg_patch's sliding-window attention but was called without lsg_patch's "
            "per-call state: call the whole model, not a single layer, and do not set "
            f"attn_implementation={SLIDING_ATTENTION_NAME!r} by hand"
        )
    if getattr(module, "is_causal", False):
        raise ValueError(f"{type(module).__name__} is causal; {SLIDING_ATTENTION_NAME!r} is bidirectional only")
    keys = F.pad(call.token_mask, (call.layout.num_global_tokens, 0), value=True)
    if keys.shape[1] != key.shape[-2]:
        raise ValueError(
            f"{type(module).__name__} got {key.shape[-2]} keys for a call of {keys.shape[1]} positions "
            "([globals; tokens; padding]): lsg_patch keeps no key/value cache; call the model with use_cache=False"
        )
    output = sliding_window_attention(query, key, value, keys, module.config.sliding_window, dropout_p=dropout,
                                      scale=scaling)
    return output.transpose(1, 2), None
