"""The per-call LSG state: what one forward pass of a converted model hands to its LSG attention layers.

A stack hook builds one `LSGCall` per forward from the call's own arguments (token mask, block padding,
mask_first_token) and passes it down as the keyword argument `lsg_call`; transformers forwards it untouched
through its layers to the attention function. Nothing is stored on the model, so one model serves many
threads at once, and gradient checkpointing replays the same call object with its layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..attention import AttentionLayout, LSGMask

if TYPE_CHECKING:
    from .cache import LSGCache

CALL_KEYWORD = "lsg_call"


@dataclass(frozen=True)
class LSGCall:
    """mask: the block masks of this forward (built once, shared by every layer); layout: the LSG key set;
    num_tokens: the caller's token count, before global tokens and block padding (what outputs are cut to);
    token_mask: (batch, T) bool, the tokens that may be attended before mask_first_token, which only LSG layers
    apply (the key mask of the sliding-window layers, which keep their own attention); None after a cached prompt.

    Causal stacks only: row_order (batch, T), where a row's tokens were moved so that its padding follows its
    real tokens (None: not moved); cache: the LSGCache this call fills (a prompt) or reads (new tokens);
    new_positions (batch, s) CPU positions of the new tokens of a call after the prompt, with step_masks, the
    position mask of each one's key set (then `mask` is None and no global rows are in the input).
    """

    mask: LSGMask | None
    layout: AttentionLayout
    num_tokens: int
    token_mask: torch.Tensor | None = None
    row_order: torch.Tensor | None = None
    cache: "LSGCache | None" = None
    new_positions: torch.Tensor | None = None
    step_masks: tuple[torch.Tensor, ...] = ()

    @property
    def continues(self) -> bool:
        """True for a call that adds tokens after a cached prompt."""
        return self.new_positions is not None
