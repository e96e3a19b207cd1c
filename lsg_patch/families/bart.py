"""BART, mBART and Pegasus: encoder-decoder models whose encoder embeds its own input.

The encoder's pre-hook pads `input_ids` with the pad token (the padded rows are real pad embeddings plus
positions, docs/LSG_SPEC.md section 5), embeds them, and hands the encoder `inputs_embeds = [globals; tokens]`.
A pair of hooks on the encoder's position table looks positions up for the T tokens only and gives the G
global rows none, so the upstream sum `inputs_embeds + positions`, `layernorm_embedding` (BART, mBART) and
dropout run over [globals; tokens] exactly as in the reference (section 4); the global rows are not scaled
by embed_scale. The encoder gets no attention mask (transformers then builds no O(T^2) mask) but the
per-call LSG state as the keyword `lsg_call`, which it passes on to every layer and so to the attention
function (gradient checkpointing replays it with the layer). Nothing is stored on the model between hooks.

With pass_global_tokens_to_decoder (the default) the encoder output keeps its G global rows and the
decoder's `encoder_attention_mask` is left-padded with G ones by a decoder pre-hook (section 7b); the
decoder and its cross-attention are the stock ones.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..attention.backends import exporting
from ..hooks import LSGHook
from ..registry_paths import get_submodule
from ..seam import CALL_KEYWORD
from .base import (FamilyAdapter, LengthCheck, NoPositionForGlobals, OutputTrim, TokenPositionsOnly, block_padding,
                   build_call, get_argument, pad_tokens, refuse_attention_weights, set_argument, token_mask_from,
                   with_global_rows)

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


class BartFamily(FamilyAdapter):
    """BART and mBART: `embed_tokens` applies embed_scale itself (a ScaledWordEmbedding)."""

    @staticmethod
    def token_embeddings(encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """What the upstream encoder computes from input_ids before adding positions."""
        return encoder.embed_tokens(input_ids)

    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        encoder = get_submodule(base_model, entry.encoder)
        LengthCheck(max_length).register_pre(encoder)
        EncoderInput(self.token_embeddings, base_model.config.pad_token_id, lsg).register_pre(encoder)
        OutputTrim(lsg.num_global_tokens, lsg.pool_with_global, lsg.pass_global_tokens_to_decoder).register_post(encoder)
        positions = get_submodule(base_model, entry.position_embeddings)
        TokenPositionsOnly(lsg.num_global_tokens).register_pre(positions)
        NoPositionForGlobals(lsg.num_global_tokens).register_post(positions)
        if lsg.pass_global_tokens_to_decoder:
            decoder = getattr(base_model, "decoder", None)
            if decoder is not None:
                CrossAttentionMask(lsg.num_global_tokens).register_pre(decoder)


class PegasusFamily(BartFamily):
    """Pegasus: `embed_tokens` is a plain embedding; the encoder multiplies by its `embed_scale`."""

    @staticmethod
    def token_embeddings(encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return encoder.embed_tokens(input_ids) * encoder.embed_scale


class EncoderInput(LSGHook):
    """Encoder pre-hook: block padding (pad tokens), the per-call state, and inputs_embeds = [globals; tokens]."""

    def __init__(self, token_embeddings: Any, pad_token_id: int | None, lsg: "LSGConfig") -> None:
        self.token_embeddings = token_embeddings
        self.pad_token_id = pad_token_id
        self.lsg = lsg

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        refuse_attention_weights(module, kwargs)
        input_ids = get_argument(module, args, kwargs, "input_ids")
        embeds = get_argument(module, args, kwargs, "inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            return args, kwargs  # upstream raises its own error for this call
        batch, length = reference.shape[:2]
        token_mask = token_mask_from(get_argument(module, args, kwargs, "attention_mask"), batch, length, reference.device)
        padding = block_padding(length, self.lsg)
        if input_ids is not None:
            if exporting() or padding:
                input_ids = pad_tokens(input_ids, padding, self._pad_id(length))
            embeds = self.token_embeddings(module, input_ids)
        else:  # padded rows are masked and trimmed, so their content is never seen
            embeds = pad_tokens(embeds, padding)
        token_mask = pad_tokens(token_mask, padding, False)
        kwargs = {**kwargs, CALL_KEYWORD: build_call(token_mask, length, self.lsg)}
        args, kwargs = set_argument(module, args, kwargs, "input_ids", None)
        args, kwargs = set_argument(module, args, kwargs, "attention_mask", None)
        embeds = with_global_rows(module.global_embeddings, embeds, self.lsg.num_global_tokens)
        return set_argument(module, args, kwargs, "inputs_embeds", embeds)

    def _pad_id(self, length: int) -> int:
        if self.pad_token_id is None:
            raise ValueError(
                f"an input of {length} tokens must be padded to a multiple of block_size={self.lsg.block_size}, "
                "but the model config has no pad_token_id; set model.config.pad_token_id or pad the input yourself"
            )
        return self.pad_token_id


class CrossAttentionMask(LSGHook):
    """Decoder pre-hook: left-pad a 2-D encoder_attention_mask with G ones when the encoder output carries
    the G global rows in front (also when encoder outputs are reused, as in generate)."""

    def __init__(self, num_global_tokens: int) -> None:
        self.num_global_tokens = num_global_tokens

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = get_argument(module, args, kwargs, "encoder_attention_mask")
        states = get_argument(module, args, kwargs, "encoder_hidden_states")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or states is None:
            return None
        if mask.shape[1] + self.num_global_tokens != states.shape[1]:
            return None
        ones = mask.new_ones(mask.shape[0], self.num_global_tokens)
        return set_argument(module, args, kwargs, "encoder_attention_mask", torch.cat([ones, mask], dim=1))
