"""Stacks whose base model embeds its own input: decoder-only LMs (GPT-2, Llama, Mistral, Qwen2, Qwen3; causal
LSG) and rotary encoders (GTE, NomicBERT, jina-embeddings-v3, EuroBERT; bidirectional LSG).

A pre-hook on the base model embeds `input_ids` itself, appends block padding (zero vectors, masked; at the end,
so no real token of a causal model ever sees it), prepends the G global rows and hands the model
`inputs_embeds = [globals; tokens; padding]`, no dense mask, and the per-call state as `lsg_call`. The global
tokens are a prefix: causal global queries see the globals only, and every token sees them. Given
token_type_ids get type 0 for the global rows and the padding.

Positions, by the entry's position kind:
* rotary: the model numbers [globals; tokens] 0..G+T-1, so the globals sit at 0..G-1 and the tokens are shifted
  by G. Rotary scores depend only on the distance between query and key, so token-to-token scores are exactly
  those of the unconverted model; the globals act as the first G positions of every input. Given position_ids
  are shifted by G the same way.
* learned (GPT-2): the tokens keep their positions 0..T-1 and the globals get no position vector (the table's
  hooks look positions up for the tokens only), as in the BERT and BART families.

No key/value cache yet: a call that asks for one (use_cache=True, a cache object, generate's default) raises.
A post-hook cuts the output back to one row per input token; for encoders (bidirectional attention),
pool_with_global puts global token 0's output in the first row, as for BERT (docs/LSG_SPEC.md section 7b).
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import LSGHook
from ..registry_paths import find_modules, get_submodule
from ..seam import CALL_KEYWORD
from .base import (NO_CACHE, FamilyAdapter, LengthCheck, NoPositionForGlobals, OutputTrim, TokenPositionsOnly,
                   block_padding, build_call, cache_argument, get_argument, set_argument, token_mask_from,
                   with_global_rows)

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry

class StackFamily(FamilyAdapter):
    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        causal = any(getattr(module, "is_causal", False) for _, _, module in find_modules(base_model, entry.self_attention))
        LengthCheck(max_length).register_pre(base_model)
        StackInput(lsg, entry.position_kind, entry.keep_sliding_window_layers).register_pre(base_model)
        OutputTrim(lsg.num_global_tokens, lsg.pool_with_global and not causal).register_post(base_model)
        if entry.has_position_table:
            table = get_submodule(base_model, entry.position_embeddings)
            TokenPositionsOnly(lsg.num_global_tokens).register_pre(table)
            NoPositionForGlobals(lsg.num_global_tokens).register_post(table)


class StackInput(LSGHook):
    """Base-model pre-hook: inputs_embeds = [globals; tokens; padding], positions, and the per-call state."""

    def __init__(self, lsg: "LSGConfig", position_kind: str, keep_sliding_window_layers: bool = False) -> None:
        self.lsg = lsg
        self.position_kind = position_kind
        self.keep_sliding_window_layers = keep_sliding_window_layers

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        input_ids = get_argument(module, args, kwargs, "input_ids")
        embeds = get_argument(module, args, kwargs, "inputs_embeds")
        if input_ids is None and embeds is None:
            return None  # upstream raises its own error for this call
        accepts = inspect.signature(module.forward).parameters
        use_cache = get_argument(module, args, kwargs, "use_cache") if "use_cache" in accepts else None
        if use_cache or cache_argument(kwargs) is not None:
            raise ValueError(NO_CACHE)
        reference = input_ids if input_ids is not None else embeds[..., 0]
        if reference.dim() != 2:
            raise ValueError(f"LSG takes (batch, tokens) inputs; got input of shape {tuple(reference.shape)}")
        if embeds is None:
            embeds = module.get_input_embeddings()(input_ids)
        batch, length = reference.shape
        token_mask = token_mask_from(get_argument(module, args, kwargs, "attention_mask"), batch, length, embeds.device)
        padding = block_padding(length, self.lsg)
        if padding:
            embeds = F.pad(embeds, (0, 0, 0, padding))
            token_mask = F.pad(token_mask, (0, padding), value=False)
        count = self.lsg.num_global_tokens
        positions = self._positions(get_argument(module, args, kwargs, "position_ids"), length, padding, embeds.device)
        kwargs = {**kwargs, CALL_KEYWORD: build_call(token_mask, length, self.lsg)}
        embeds = with_global_rows(module.global_embeddings, embeds, count)
        changes = {"input_ids": None, "attention_mask": None, "position_ids": positions, "inputs_embeds": embeds}
        if self.keep_sliding_window_layers:
            changes["attention_mask"] = _layer_type_masks(module.config)
        if "use_cache" in accepts:
            changes["use_cache"] = False
        token_types = get_argument(module, args, kwargs, "token_type_ids") if "token_type_ids" in accepts else None
        if token_types is not None:
            changes["token_type_ids"] = F.pad(token_types.expand(batch, -1), (count, padding))
        for name, value in changes.items():
            args, kwargs = set_argument(module, args, kwargs, name, value)
        return args, kwargs

    def _positions(self, given: torch.Tensor | None, length: int, padding: int, device: torch.device
                   ) -> torch.Tensor | None:
        """Position ids of [globals; tokens; padding] (see the module docstring); None: the model's own count."""
        if given is None and self.position_kind == "rotary":
            return None
        tokens = torch.arange(length, device=device)[None] if given is None else given
        if padding:
            tokens = torch.cat([tokens, tokens[:, -1:] + torch.arange(1, padding + 1, device=device)], dim=1)
        count = self.lsg.num_global_tokens
        if self.position_kind == "rotary":
            return torch.cat([torch.arange(count, device=device).expand(tokens.shape[0], -1), tokens + count], dim=1)
        return torch.cat([tokens.new_zeros(tokens.shape[0], count), tokens], dim=1)  # global rows: looked up by no one


def _layer_type_masks(config: Any) -> dict[str, None]:
    """What a model with sliding-window and global layers (ModernBERT) takes as `attention_mask`: one mask per
    layer type, all None, so that it builds none (a dense windowed mask would be (n, n)). The LSG (global) layers
    and the sliding-window layers ("lsg_sliding", banded) both read their key mask from the call."""
    return dict.fromkeys(config.layer_types)
