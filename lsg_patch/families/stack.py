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

Causal stacks keep an LSGCache (lsg_patch/seam/lsg_cache.py) when the call asks for a cache: a prompt fills it, and
later calls feed only their new tokens, without global rows, each right after its row's own real tokens. Rows are
placed so that their real tokens come first (left padding moved behind them), in calls with or without a cache: a
row's blocks never depend on its padding, and every row gives what it gives alone. Encoders refuse a cache.
A post-hook cuts the output back to one row per input token; for encoders (bidirectional attention),
pool_with_global puts global token 0's output in the first row, as for BERT (docs/LSG_SPEC.md section 7b), and
moved rows go back to the caller's order.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.backends import exporting
from ..hooks import LSGHook
from ..registry_paths import find_modules, get_submodule
from ..seam import CALL_KEYWORD, LSGCall
from ..seam.lsg_cache import LSGCache
from .base import (FamilyAdapter, LengthCheck, NoPositionForGlobals, OutputTrim, TokenPositionsOnly, block_padding,
                   build_call, forward_parameters, get_argument, pad_tokens, refuse_attention_weights, set_argument,
                   tables_see_globals, token_inputs, token_mask_from, with_global_rows)
from .cache_routing import (cache_arguments, new_tokens_are_real, next_positions, padding_last, positions_after_gaps,
                      resolve_cache, room_for, take_rows)

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry

class StackFamily(FamilyAdapter):
    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        causal = any(getattr(module, "is_causal", False) for _, _, module in find_modules(base_model, entry.self_attention))
        table = get_submodule(base_model, entry.position_embeddings) if entry.has_position_table else None
        LengthCheck(max_length, table).register_pre(base_model)
        StackInput(lsg, max_length, entry.position_kind, causal, table, entry.keep_sliding_window_layers
                   ).register_pre(base_model)
        if table is not None and causal:
            TablesSeeGlobalsAgain(table).register_always(base_model)
        OutputTrim(lsg.num_global_tokens, lsg.pool_with_global and not causal).register_post(base_model)
        if table is not None:
            TokenPositionsOnly(lsg.num_global_tokens).register_pre(table)
            NoPositionForGlobals(lsg.num_global_tokens).register_post(table)


class TablesSeeGlobalsAgain(LSGHook):
    """Base-model post-hook, run also when the call raises: clears the "no global rows" note a call after a cached
    prompt left for its table. Left set, it names the table by id, and a table of another model (BART) that later
    gets the same id once this model is freed would look up positions without its global rows."""

    def __init__(self, table: nn.Module) -> None:
        self.table = table

    def register_always(self, module: nn.Module) -> None:
        module.register_forward_hook(self, with_kwargs=True, always_call=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        tables_see_globals(self.table, True)


class StackInput(LSGHook):
    """Base-model pre-hook: inputs_embeds = [globals; tokens; padding], positions, and the per-call state; for causal
    stacks also the LSGCache, and the calls that continue a cached prompt."""

    def __init__(self, lsg: "LSGConfig", max_length: int, position_kind: str, causal: bool,
                 table: nn.Module | None = None, keep_sliding_window_layers: bool = False) -> None:
        self.lsg = lsg
        self.max_length = max_length
        self.position_kind = position_kind
        self.causal = causal
        self.table = table
        self.keep_sliding_window_layers = keep_sliding_window_layers

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        refuse_attention_weights(module, kwargs)
        input_ids, embeds, reference = token_inputs(module, args, kwargs)
        if reference is None:
            return None  # upstream raises its own error for this call
        if reference.dim() != 2:
            raise ValueError(f"LSG takes (batch, tokens) inputs; got input of shape {tuple(reference.shape)}")
        cache = resolve_cache(module, args, kwargs, self.lsg, self.causal)
        tables_see_globals(self.table, cache is None or cache.columns == 0)
        if embeds is None:
            embeds = module.get_input_embeddings()(input_ids)
        if cache is not None and cache.columns:
            changes = self._continue(module, args, kwargs, cache, embeds)
        else:
            changes = self._prompt(module, args, kwargs, cache, embeds, reference.shape)
        kwargs = {**kwargs, CALL_KEYWORD: changes.pop(CALL_KEYWORD)}
        for name, value in changes.items():
            args, kwargs = set_argument(module, args, kwargs, name, value)
        return args, kwargs

    def _prompt(self, module: nn.Module, args: tuple, kwargs: dict, cache: LSGCache | None, embeds: torch.Tensor,
                shape: torch.Size) -> dict[str, Any]:
        """A whole input (or a prompt that starts a cache): [globals; tokens; padding] and the per-call state."""
        batch, length = shape
        accepts = forward_parameters(module)
        token_mask = token_mask_from(get_argument(module, args, kwargs, "attention_mask"), batch, length, embeds.device,
                                     self.causal)
        given_positions = get_argument(module, args, kwargs, "position_ids")
        if self.causal:
            given_positions = positions_after_gaps(given_positions, token_mask)
        token_types = get_argument(module, args, kwargs, "token_type_ids") if "token_type_ids" in accepts else None
        row_order = padding_last(token_mask) if self.causal else None
        if row_order is not None:  # each row's real tokens first: its blocks do not depend on its padding
            embeds, token_mask, given_positions, token_types = (
                take_rows(x, row_order) for x in (embeds, token_mask, given_positions, token_types))
        padding = block_padding(length, self.lsg)
        embeds, token_mask = pad_tokens(embeds, padding), pad_tokens(token_mask, padding, False)
        count = self.lsg.num_global_tokens
        call = build_call(token_mask, length, self.lsg)
        if cache is not None:
            real = token_mask.sum(dim=1)
            cache.start(real, length, next_positions(given_positions, real))
        call = replace(call, row_order=row_order, cache=cache)
        embeds = with_global_rows(module.global_embeddings, embeds, count)
        changes = {CALL_KEYWORD: call, "input_ids": None, "attention_mask": None, "inputs_embeds": embeds,
                   "position_ids": self._positions(given_positions, length, padding, embeds.device)}
        if self.keep_sliding_window_layers:
            changes["attention_mask"] = _layer_type_masks(module.config)
        elif exporting():  # traced, transformers would build a dense (n, n) mask for None; it keeps a prepared one
            changes["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=embeds.device)
        changes.update(cache_arguments(module, kwargs, cache))
        if token_types is not None:
            changes["token_type_ids"] = pad_tokens(F.pad(token_types.expand(batch, -1), (count, 0)), padding)
        return changes

    def _continue(self, module: nn.Module, args: tuple, kwargs: dict, cache: LSGCache, embeds: torch.Tensor
                  ) -> dict[str, Any]:
        """New tokens after a cached prompt: no global rows (the cache holds their keys), each row's tokens right
        after its own real tokens, with the position ids that follow its prompt's. Given position_ids are not read
        here: for right-padded rows generate counts the padding in, and a row's place in its blocks is fixed."""
        batch, new = embeds.shape[:2]
        if batch != cache.batch_size:
            raise ValueError(f"this LSGCache holds {cache.batch_size} rows but the call has {batch}; pass the cache of "
                             "the same batch (or none, to start a new one)")
        new_tokens_are_real(module, args, kwargs, new)
        room_for(cache, new, self.max_length)
        indices, positions = cache.advance(new)
        ids = positions.to(embeds.device) + (self.lsg.num_global_tokens if self.position_kind == "rotary" else 0)
        call = LSGCall(None, self.lsg.layout, new, cache=cache, new_positions=indices,
                       step_masks=cache.step_masks(indices, embeds.device))
        changes = {CALL_KEYWORD: call, "input_ids": None, "attention_mask": None, "inputs_embeds": embeds,
                   "position_ids": ids}
        changes.update(cache_arguments(module, kwargs, cache))
        return changes

    def _positions(self, given: torch.Tensor | None, length: int, padding: int, device: torch.device
                   ) -> torch.Tensor:
        """Position ids of [globals; tokens; padding] (see the module docstring), always explicit: with a cache the
        model would count from the cache's length, which already includes this prompt."""
        tokens = torch.arange(length, device=device)[None] if given is None else given
        if exporting() or padding:  # masked and trimmed: the last token's position, which a learned table always has
            # where() over whole blocks, not cat with a (batch, padding) tensor: no size the tracer cannot prove >= 0
            in_padding = torch.arange(length + padding, device=device) >= length
            tokens = torch.where(in_padding, tokens[:, -1:], pad_tokens(tokens, padding))
        count = self.lsg.num_global_tokens
        if self.position_kind == "rotary":
            return torch.cat([torch.arange(count, device=device).expand(tokens.shape[0], -1), tokens + count], dim=1)
        return torch.cat([tokens.new_zeros(tokens.shape[0], count), tokens], dim=1)  # global rows: looked up by no one


def _layer_type_masks(config: Any) -> dict[str, None]:
    """What a model with sliding-window and global layers (ModernBERT) takes as `attention_mask`: one mask per
    layer type, all None, so that it builds none (a dense windowed mask would be (n, n)). The LSG (global) layers
    and the sliding-window layers ("lsg_sliding", banded) both read their key mask from the call."""
    return dict.fromkeys(config.layer_types)
