"""LSG as a transformers attention implementation: the "lsg" attention and mask functions.

transformers 5.x calls self-attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` as
`(module, query, key, value, attention_mask, scaling=, dropout=, **kwargs)` with queries (batch, heads, n, d)
and expects (batch, n, heads, d) back. lsg_patch registers one function under the new key "lsg" (never
replacing an existing key) and selects it only for the self-attention modules it converts (see
`selection.py`): cross-attention, decoders and every other model keep their own implementation.

The function reads the per-call state (`LSGCall`) from its keyword arguments, where the stack hook put it;
the `attention_mask` argument is not used by LSG layers. The mask function registered under the same key
builds transformers' own sdpa masks, so a mask requested under "lsg" is never silently dropped.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from ..attention import RelativeBias, lsg_attention
from .call import CALL_KEYWORD, LSGCall
from .sliding import SLIDING_ATTENTION_NAME, sliding_attention_function

ATTENTION_NAME = "lsg"
_registration_lock = threading.Lock()


def lsg_attention_function(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """LSG attention of one converted module; (batch, n, heads, d) out and no attention weights.

    Keys with fewer heads than the queries (grouped-query attention) are handed to `lsg_attention` as they are:
    it shares them where it can and repeats them where it cannot. A
    `position_bias` keyword (T5) must be a RelativeBias, applied inside every key set: a dense (n, n) bias
    cannot be, and would cost the memory LSG saves. With an LSGCache in the call (causal stacks), a prompt also
    stores what later tokens can read, and a call after the prompt attends through the cache.
    """
    call = kwargs.get(CALL_KEYWORD)
    if not isinstance(call, LSGCall):
        raise RuntimeError(
            f"{type(module).__name__} runs LSG attention but was called without lsg_patch's per-call state: call the "
            "whole model (or its encoder), not a single layer, and do not set attn_implementation='lsg' by hand "
            "(lsg_patch.to_lsg selects it for the modules it converts)"
        )
    cache = call.cache
    if cache is None and key.shape[-2] != query.shape[-2]:
        raise ValueError(
            f"LSG attention got {query.shape[-2]} queries but {key.shape[-2]} keys from a cache that is not an "
            "LSGCache: causal LSG models keep their own (see lsg_patch.LSGCache); pass none, or use_cache=False"
        )
    bias = kwargs.get("position_bias")
    if bias is not None and not isinstance(bias, RelativeBias):
        raise ValueError(
            f"{type(module).__name__} passed a dense position_bias of shape {tuple(getattr(bias, 'shape', ()))} to LSG "
            "attention, which applies relative position biases inside its key sets from a RelativeBias (the family "
            "hooks pass one to the layer that owns the bias table): call the whole model or its encoder"
        )
    repeats = query.shape[1] // key.shape[1]
    lsh_seed = module.config.lsh_seed
    causal = bool(getattr(module, "is_causal", False))
    if call.continues:
        output = cache.attend(module.layer_idx, query, key, value, repeats, call.new_positions, call.step_masks,
                              _scale(query, scaling), dropout, lsh_seed)
    else:
        output = lsg_attention(query, key, value, call.mask, call.layout, dropout_p=dropout, causal=causal,
                               scale=scaling, lsh_seed=lsh_seed, bias=bias)
    if cache is not None and not call.continues:
        cache.store_prompt(module.layer_idx, query, key, value, repeats, call.mask.tokens, _scale(query, scaling),
                           lsh_seed)
    return output.transpose(1, 2), None


def _scale(query: torch.Tensor, scaling: float | None) -> float:
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def lsg_mask_function(*args: Any, **kwargs: Any) -> Any:
    """Masks requested under "lsg" by modeling code (never by LSG layers, which read the call): sdpa's masks."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_with_transformers() -> None:
    """Register the "lsg" attention and mask functions and the "lsg_sliding" attention function once; refuse if
    another function holds one of the keys."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    with _registration_lock:
        for interface, name, function in ((AttentionInterface, ATTENTION_NAME, lsg_attention_function),
                                          (AttentionMaskInterface, ATTENTION_NAME, lsg_mask_function),
                                          (AttentionInterface, SLIDING_ATTENTION_NAME, sliding_attention_function)):
            current = interface._global_mapping.get(name)
            if current is None:
                interface.register(name, function)
            elif current is not function:
                raise RuntimeError(
                    f"transformers' {interface.__name__} already holds another function under {name!r} "
                    f"({current!r}); lsg_patch never replaces a registered attention implementation"
                )
