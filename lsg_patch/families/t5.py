"""T5, mT5 and UMT5: encoder-decoder models with a relative position bias instead of position vectors.

The encoder (a T5Stack) gets the BART family's hooks: `input_ids` padded to whole blocks with the pad token,
embedded by `embed_tokens`, and `inputs_embeds = [globals; tokens]` with the per-call state `lsg_call`; the
encoder output keeps its G global rows for the decoder's cross-attention (pass_global_tokens_to_decoder, with
the decoder's encoder_attention_mask left-padded), and encoder-only models (T5EncoderModel and the heads built
on it) drop them. The decoder, its cross-attention and its position bias are the stock ones.

Positions: T5 has none in its input; layer 0's self-attention computes a dense (1, heads, n, n) bias from its
`relative_attention_bias` table and the stack hands it to every later layer. For the converted layer that
owns the table, a pre-hook passes a `RelativeBias` (the table and T5's bucket settings) as `position_bias`
instead, so `compute_bias` never runs; T5 hands that object on to the other layers like its dense bias, and
the "lsg" attention applies it inside every key set (docs/LSG_SPEC.md section 7c). Global tokens have no
position and get no bias.

UMT5 has a table in every layer and calls `compute_bias` unconditionally, so no hook can stop it from building the
dense bias: each converted encoder attention gets an instance attribute `compute_bias` (`RelativeBiasOf`) that
returns its RelativeBias instead, removed again by `from_lsg` (`remove`).
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from ..attention import RelativeBias
from ..hooks import LSGHook
from ..registry_paths import find_modules, get_submodule
from .bart import BartFamily, CrossAttentionMask, EncoderInput
from .base import FamilyAdapter, LengthCheck, OutputTrim, get_argument, set_argument

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


class T5Family(FamilyAdapter):
    """T5 and mT5: layer 0 owns the bias table, the stack hands its position_bias on to the other layers."""

    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        encoder = get_submodule(base_model, entry.encoder)
        decoder = getattr(base_model, "decoder", None)
        keep_globals = lsg.pass_global_tokens_to_decoder and decoder is not None
        LengthCheck(max_length).register_pre(encoder)
        EncoderInput(BartFamily.token_embeddings, base_model.config.pad_token_id, lsg).register_pre(encoder)
        OutputTrim(lsg.num_global_tokens, lsg.pool_with_global, keep_globals).register_post(encoder)
        for _, _, attention in find_modules(base_model, entry.self_attention):
            takes_bias = "position_bias" in inspect.signature(attention.forward).parameters  # UMT5's does not
            if attention.has_relative_attention_bias and takes_bias:
                RelativeBiasInput().register_pre(attention)
        if keep_globals:
            CrossAttentionMask(lsg.num_global_tokens).register_pre(decoder)


class UMT5Family(T5Family):
    """UMT5: a table in every layer, computed by every layer whatever position_bias it is given."""

    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        super().install_hooks(base_model, entry, lsg, max_length)
        for _, _, attention in find_modules(base_model, entry.self_attention):
            attention.compute_bias = RelativeBiasOf(attention)

    def remove(self, base_model: nn.Module, entry: "ArchitectureEntry") -> None:
        for _, _, attention in find_modules(base_model, entry.self_attention):
            attention.__dict__.pop("compute_bias", None)


def relative_bias_of(attention: nn.Module) -> RelativeBias:
    """The bias compute_bias would build densely, as the attention's table and bucket settings: T5's bucket
    function takes them as arguments, UMT5's reads them from the module."""
    bucket = attention._relative_position_bucket
    if "num_buckets" in inspect.signature(bucket).parameters:
        bucket = partial(bucket, bidirectional=not attention.is_decoder,
                         num_buckets=attention.relative_attention_num_buckets,
                         max_distance=attention.relative_attention_max_distance)
    return RelativeBias(attention.relative_attention_bias.weight, bucket)


class RelativeBiasOf:
    """A converted UMT5Attention's `compute_bias`: its RelativeBias, whatever the lengths (picklable)."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention

    def __call__(self, query_length: int, key_length: int, device: object = None, past_seen_tokens: int = 0
                 ) -> RelativeBias:
        return relative_bias_of(self.attention)


class RelativeBiasInput(LSGHook):
    """Pre-hook of the converted T5Attention that owns the bias table: position_bias = its RelativeBias when the
    caller gave none (the first layer of every encoder call), so no (n, n) bias is built."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if get_argument(module, args, kwargs, "position_bias") is not None:
            return None
        return set_argument(module, args, kwargs, "position_bias", relative_bias_of(module))
