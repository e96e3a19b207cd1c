"""The per-call LSG state: what one forward pass of a converted model hands to its LSG attention layers.

A stack hook builds one `LSGCall` per forward from the call's own arguments (token mask, block padding,
mask_first_token) and passes it down as the keyword argument `lsg_call`; transformers forwards it untouched
through its layers to the attention function. Nothing is stored on the model, so one model serves many
threads at once, and gradient checkpointing replays the same call object with its layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionLayout, LSGMask

CALL_KEYWORD = "lsg_call"


@dataclass(frozen=True)
class LSGCall:
    """mask: the block masks of this forward (built once, shared by every layer); layout: the LSG key set;
    num_tokens: the caller's token count, before global tokens and block padding (what outputs are cut to);
    token_mask: (batch, T) bool, the tokens that may be attended before mask_first_token, which only LSG layers
    apply (the key mask of the sliding-window layers, which keep their own attention)."""

    mask: LSGMask
    layout: AttentionLayout
    num_tokens: int
    token_mask: torch.Tensor
