"""T5 and mT5: encoder-decoder models with a relative position bias instead of position vectors.

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
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from ..attention import RelativeBias
from ..hooks import LSGHook
from ..registry_paths import find_modules, get_submodule
from .bart import BartFamily, CrossAttentionMask, EncoderInput, EncoderOutput
from .base import FamilyAdapter, LengthCheck, get_argument, set_argument

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


class T5Family(FamilyAdapter):
    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        encoder = get_submodule(base_model, entry.encoder)
        decoder = getattr(base_model, "decoder", None)
        keep_globals = lsg.pass_global_tokens_to_decoder and decoder is not None
        LengthCheck(max_length).register_pre(encoder)
        EncoderInput(BartFamily.token_embeddings, base_model.config.pad_token_id, lsg).register_pre(encoder)
        EncoderOutput(lsg, keep_globals).register_post(encoder)
        for _, _, attention in find_modules(base_model, entry.self_attention):
            if attention.has_relative_attention_bias:
                RelativeBiasInput().register_pre(attention)
        if keep_globals:
            CrossAttentionMask(lsg.num_global_tokens).register_pre(decoder)


def relative_bias_of(attention: nn.Module) -> RelativeBias:
    """The bias T5Attention.compute_bias would build densely, as its table and bucket settings."""
    bucket = partial(type(attention)._relative_position_bucket, bidirectional=not attention.is_decoder,
                     num_buckets=attention.relative_attention_num_buckets,
                     max_distance=attention.relative_attention_max_distance)
    return RelativeBias(attention.relative_attention_bias.weight, bucket)


class RelativeBiasInput(LSGHook):
    """Pre-hook of the converted T5Attention that owns the bias table: position_bias = its RelativeBias when the
    caller gave none (the first layer of every encoder call), so no (n, n) bias is built."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if get_argument(module, args, kwargs, "position_bias") is not None:
            return None
        return set_argument(module, args, kwargs, "position_bias", relative_bias_of(module))
