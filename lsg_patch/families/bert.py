"""BERT, RoBERTa, CamemBERT, XLM-RoBERTa and ELECTRA: one encoder layout, one adapter.

Global tokens are embedded like tokens without word, position or type vectors (LayerNorm and dropout
only, then ELECTRA's projection), prepended to the embedding output; block padding appends zero
vectors (docs/LSG_SPEC.md sections 4, 5 and 7b).

Configured as decoders (is_decoder=True: LMHeadModel, ForCausalLM) they take causal LSG and keep an LSGCache, as the
decoder-only stacks do: a base-model hook resolves the cache, puts each row's real tokens first before the
embeddings (so positions and blocks do not depend on padding), and gives the tokens after a cached prompt their
positions; the encoder hook fills or reads the cache.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..hooks import LSGHook
from ..registry_paths import find_modules, get_submodule
from ..seam import CALL_KEYWORD, LSGCall
from ..seam.lsg_cache import LSGCache
from .base import (FamilyAdapter, LengthCheck, OutputTrim, block_padding, build_call, get_argument, pad_tokens,
                   refuse_attention_weights, set_argument, token_inputs, token_mask_from, token_rows,
                   trimmed_hidden_states)
from .cache_routing import (cache_arguments, given_cache, new_tokens_are_real, next_positions, padding_last,
                      positions_after_gaps, resolve_cache, room_for, take_rows)

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry

# From the base-model hook to the encoder hook, through the model's **kwargs: the caller's key mask (read before
# transformers turns it into the mask of the implementation the model was built with: sdpa, eager, flex's BlockMask),
# and for decoders the row order and the position id each row's next token takes.
TOKEN_MASK_KEYWORD, ROW_ORDER_KEYWORD, NEXT_POSITIONS_KEYWORD = "lsg_token_mask", "lsg_row_order", "lsg_next_positions"


class BertFamily(FamilyAdapter):
    """Hooks on the embeddings (length check) and on the encoder (globals, padding, per-call state, trimming), and
    for decoders on the base model (cache, row placement)."""

    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        LengthCheck(max_length, get_submodule(base_model, entry.position_embeddings)
                    ).register_pre(get_submodule(base_model, entry.embeddings))
        encoder = get_submodule(base_model, entry.encoder)
        global_rows = BertGlobalRows(
            get_submodule(base_model, entry.embeddings), getattr(base_model, "embeddings_project", None)
        )
        causal = any(getattr(module, "is_causal", False) for _, _, module in find_modules(base_model, entry.self_attention))
        if causal:
            DecoderRows(lsg, max_length, entry.position_offset).register_pre(base_model)
        else:
            CallerMask().register_pre(base_model)
            if global_rows.projection is None:
                GlobalRowsInFront(global_rows, lsg).register_post(get_submodule(base_model, entry.embeddings))
        BertEncoderInput(global_rows, lsg, entry.position_offset, causal).register_pre(encoder)
        if causal and lsg.pool_with_global:  # before OutputTrim: it reads the global rows the trim drops
            PooledFirstRow().register_post(encoder)
        OutputTrim(lsg.num_global_tokens, lsg.pool_with_global).register_post(encoder)
        HiddenStatesTrim(lsg).register_post(base_model)


class HiddenStatesTrim(LSGHook):
    """Post-hook of a base model whose hidden states transformers collects around the hooked encoder (BERT family):
    the caller's token rows of every hidden state the encoder computed on [globals; tokens; block padding]."""

    def __init__(self, lsg: "LSGConfig") -> None:
        self.lsg = lsg

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        reference = token_inputs(module, args, kwargs)[2]
        if reference is None or reference.dim() != 2:
            return None
        length, count = reference.shape[1], self.lsg.num_global_tokens
        order = kwargs.get(ROW_ORDER_KEYWORD)
        return trimmed_hidden_states(output, count + length + block_padding(length, self.lsg),
                                     lambda h: token_rows(h, count, length, order))


class BertGlobalRows:
    """Embeds the global tokens as the embedding stage would: LayerNorm, dropout, optional projection."""

    def __init__(self, embeddings: nn.Module, projection: nn.Module | None) -> None:
        self.embeddings = embeddings
        self.projection = projection

    def __call__(self, count: int, batch: int) -> torch.Tensor:
        rows = self.embeddings.global_embeddings.weight[:count].unsqueeze(0).expand(batch, -1, -1)
        rows = self.embeddings.dropout(self.embeddings.LayerNorm(rows))
        return self.projection(rows) if self.projection is not None else rows


class BertEncoderInput(LSGHook):
    """Encoder pre-hook: [globals; tokens; zero padding], and the per-call state (masks built once per forward)
    passed down to the layers as `lsg_call`; the encoder's dense mask is dropped. With an LSGCache (decoders), a
    prompt starts it and the tokens after it attend through it, without global rows."""

    def __init__(self, global_rows: BertGlobalRows, lsg: "LSGConfig", position_offset: int = 0,
                 causal: bool = False) -> None:
        self.global_rows = global_rows
        self.lsg = lsg
        self.position_offset = position_offset
        self.causal = causal

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        row_order = kwargs.pop(ROW_ORDER_KEYWORD, None)
        following = kwargs.pop(NEXT_POSITIONS_KEYWORD, None)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batch, length, _ = hidden.shape
        if isinstance(cache, LSGCache) and cache.columns:
            indices, _ = cache.advance(length)
            kwargs["attention_mask"] = None
            kwargs[CALL_KEYWORD] = LSGCall(None, self.lsg.layout, length, cache=cache, new_positions=indices,
                                           step_masks=cache.step_masks(indices, hidden.device))
            return (hidden, *args[1:]), kwargs
        if cache is not None and not isinstance(cache, LSGCache):
            raise ValueError(f"LSG encoders keep no key/value cache; got {type(cache).__name__}: use_cache=False")
        token_mask = kwargs.pop(TOKEN_MASK_KEYWORD, None)
        if token_mask is None:  # the encoder called on its own: the mask transformers prepared
            token_mask = token_mask_from(kwargs.get("attention_mask"), batch, length, hidden.device, self.causal)
        padding = block_padding(length, self.lsg)
        token_mask = pad_tokens(token_mask, padding, False)  # no new (batch, padding) tensor: no specialisation
        buffer = _buffer_of(hidden, self.lsg.num_global_tokens, padding)
        if buffer is not None:  # GlobalRowsInFront already wrote [globals; tokens; padding]
            hidden = buffer
        else:
            hidden = pad_tokens(hidden, padding)
            globals_ = self.global_rows(self.lsg.num_global_tokens, batch).to(hidden.dtype)
            hidden = torch.cat([globals_, hidden], dim=1)
        kwargs["attention_mask"] = None
        call = build_call(token_mask, length, self.lsg)
        if cache is not None:
            real = token_mask.sum(dim=1)
            cache.start(real, length, real + self.position_offset if following is None else following)
        kwargs[CALL_KEYWORD] = replace(call, row_order=row_order, cache=cache)
        return (hidden, *args[1:]), kwargs


class CallerMask(LSGHook):
    """Base-model pre-hook of encoders: the caller's attention mask read as a key mask and handed to the encoder
    hook; the model gets none, so transformers builds no dense (n, n) mask, whatever attention implementation the
    model was built with (sdpa, eager, flex_attention: LSG layers read the key mask, never that mask)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        refuse_attention_weights(module, kwargs)
        reference = token_inputs(module, args, kwargs)[2]
        if reference is None or reference.dim() != 2:
            return None  # upstream raises its own error for this call
        mask = get_argument(module, args, kwargs, "attention_mask")
        token_mask = token_mask_from(mask, *reference.shape, reference.device)
        args, kwargs = set_argument(module, args, kwargs, "attention_mask", None)
        return args, {**kwargs, TOKEN_MASK_KEYWORD: token_mask}


class GlobalRowsInFront(LSGHook):
    """Embeddings post-hook of encoders: the embeddings' output written into one buffer [globals; tokens; zero
    padding], the token rows returned as a view of it. The encoder hook takes the buffer as its input, so what the
    base model keeps of the embeddings while its encoder runs and the encoder's input are one tensor (a separate
    [globals; tokens] copy would stay alive through every layer: about 10% of the forward's peak memory)."""

    def __init__(self, global_rows: BertGlobalRows, lsg: "LSGConfig") -> None:
        self.global_rows = global_rows
        self.lsg = lsg

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if torch.compiler.is_compiling() or not isinstance(output, torch.Tensor) or output.dim() != 3:
            return None  # the encoder hook concatenates instead
        batch, length, width = output.shape
        count, padding = self.lsg.num_global_tokens, block_padding(length, self.lsg)
        buffer = output.new_empty(batch, count + length + padding, width)
        buffer[:, :count] = self.global_rows(count, batch).to(output.dtype)
        buffer[:, count : count + length] = output
        buffer[:, count + length :] = 0
        return buffer[:, count : count + length]


def _buffer_of(hidden: torch.Tensor, count: int, padding: int) -> torch.Tensor | None:
    """The [globals; tokens; padding] buffer `hidden` is the token rows of (see GlobalRowsInFront), or None."""
    base = hidden._base
    if base is None or base.dim() != 3 or base.shape != (hidden.shape[0], count + hidden.shape[1] + padding,
                                                         hidden.shape[2]):
        return None
    if hidden.stride() != base.stride() or hidden.storage_offset() != base.storage_offset() + count * base.stride(1):
        return None
    return base


class PooledFirstRow(LSGHook):
    """Encoder post-hook of BERT-family decoders under pool_with_global, whose uncached output gives each row's
    token 0 global token 0's output: a prompt keeps that row in its LSGCache, and a call after the prompt gives it
    to the rows whose token 0 it feeds (rows whose prompt was all padding), as the uncached forward would."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = kwargs[CALL_KEYWORD]
        if call.cache is None:
            return None
        if not call.continues:
            call.cache.first_row = output[0][:, :1]
            return None
        first = call.new_positions == 0
        if not bool(first.any()):
            return None
        hidden = torch.where(first.to(output[0].device)[..., None], call.cache.first_row, output[0])
        if isinstance(output, tuple):  # return_dict=False
            return (hidden, *output[1:])
        output.last_hidden_state = hidden
        return output


class DecoderRows(LSGHook):
    """Base-model pre-hook of BERT-family decoders: the call's LSGCache (or none), each row's real tokens first
    (input ids, mask, token types and given positions moved alike, before the embeddings number them), and the
    position ids of the tokens after a cached prompt (the count after each row's own real tokens, plus the table
    offset: 2 for RoBERTa-likes)."""

    def __init__(self, lsg: "LSGConfig", max_length: int, position_offset: int) -> None:
        self.lsg = lsg
        self.max_length = max_length
        self.position_offset = position_offset

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        refuse_attention_weights(module, kwargs)
        reference = token_inputs(module, args, kwargs)[2]
        if reference is None or reference.dim() != 2:
            return None  # upstream raises its own error for this call
        if get_argument(module, args, kwargs, "encoder_hidden_states") is not None:
            if given_cache(module, args, kwargs) is not None or get_argument(module, args, kwargs, "use_cache"):
                raise ValueError("LSG keeps no cache for BERT-family decoders with cross-attention (their cache holds "
                                 "the encoder's keys too); call them with use_cache=False")
            kwargs = {**kwargs, "use_cache": False}  # the config's default asks for one: run without
        cache = resolve_cache(module, args, kwargs, self.lsg, causal=True)
        changes: dict[str, Any] = cache_arguments(module, kwargs, cache)
        batch, length = reference.shape
        if cache is not None and cache.columns:
            new_tokens_are_real(module, args, kwargs, length)
            room_for(cache, length, self.max_length)
            positions = cache.upcoming_positions(length)
            changes["position_ids"] = positions.to(reference.device)
        else:
            mask = get_argument(module, args, kwargs, "attention_mask")
            token_mask = token_mask_from(mask, batch, length, reference.device, causal=True)
            row_order = padding_last(token_mask)
            given = positions_after_gaps(get_argument(module, args, kwargs, "position_ids"), token_mask)
            if given is not None:
                changes["position_ids"] = given
            if cache is not None:
                kwargs = {**kwargs, NEXT_POSITIONS_KEYWORD: next_positions(
                    take_rows(given, row_order) if row_order is not None else given, token_mask.sum(dim=1),
                    self.position_offset)}
            if row_order is not None:
                if mask.dim() != 2:
                    raise ValueError("a BERT-family decoder moves each row's padding behind its tokens, which needs a "
                                     f"2-D attention mask; got one of shape {tuple(mask.shape)}")
                for name in ("input_ids", "inputs_embeds", "token_type_ids", "position_ids"):
                    value = changes.get(name, get_argument(module, args, kwargs, name))
                    if isinstance(value, torch.Tensor):
                        changes[name] = take_rows(value, row_order)
                kwargs = {**kwargs, ROW_ORDER_KEYWORD: row_order}
                token_mask = take_rows(token_mask, row_order)
            changes["attention_mask"] = None  # the encoder hook reads the key mask; transformers builds none
            kwargs = {**kwargs, TOKEN_MASK_KEYWORD: token_mask}
        for name, value in changes.items():
            args, kwargs = set_argument(module, args, kwargs, name, value)
        return args, kwargs
