"""BERT, RoBERTa, CamemBERT, XLM-RoBERTa and ELECTRA: one encoder layout, one adapter.

Global tokens are embedded like tokens without word, position or type vectors (LayerNorm and dropout
only, then ELECTRA's projection), prepended to the embedding output; block padding appends zero
vectors (LSG_SPEC.md sections 4, 5 and 7b).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import prepare_mask
from ..hooks import LSGHook
from ..registry_paths import get_submodule
from .base import EncoderMask, FamilyAdapter, LengthCheck, LSGSelfAttention, block_padding, mask_first, token_mask_from

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


class LSGBertSelfAttention(LSGSelfAttention):
    """Replaces BertSelfAttention and its copies (RobertaSelfAttention, ElectraSelfAttention, ...)."""

    projection_names = ("query", "key", "value")

    def __init__(self, original: nn.Module, layout: Any) -> None:
        super().__init__(original, layout)
        self.dropout = original.dropout
        self.head_size = original.attention_head_size
        self.scaling = getattr(original, "scaling", self.head_size**-0.5)
        self.is_causal = bool(getattr(original, "is_causal", False))

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: Any = None, past_key_values: Any = None, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        projections = (self.query, self.key, self.value)
        return self.lsg_context(hidden_states, attention_mask, projections, self.dropout.p), None


class BertFamily(FamilyAdapter):
    """Hooks on the embeddings (length check) and on the encoder (globals, padding, mask, trimming)."""

    attention_class = LSGBertSelfAttention

    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        LengthCheck(max_length).register_pre(get_submodule(base_model, entry.embeddings))
        encoder = get_submodule(base_model, entry.encoder)
        global_rows = BertGlobalRows(
            get_submodule(base_model, entry.embeddings), getattr(base_model, "embeddings_project", None)
        )
        BertEncoderInput(global_rows, lsg).register_pre(encoder)
        EncoderOutputTrim(lsg).register_post(encoder)


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
    """Encoder pre-hook: [globals; tokens; zero padding] and the LSG mask, built once per forward."""

    def __init__(self, global_rows: BertGlobalRows, lsg: "LSGConfig") -> None:
        self.global_rows = global_rows
        self.lsg = lsg

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("use_cache") and kwargs.get("past_key_values") is not None:
            raise ValueError(
                "LSG attention keeps no key/value cache: call the model (or generate) with use_cache=False"
            )
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batch, length, _ = hidden.shape
        token_mask = token_mask_from(kwargs.get("attention_mask"), batch, length, hidden.device)
        padding = block_padding(length, self.lsg)
        if padding:  # F.pad, not cat with a new (batch, padding) tensor: no shape specialisation under compile
            hidden = F.pad(hidden, (0, 0, 0, padding))
            token_mask = F.pad(token_mask, (0, padding), value=False)
        if self.lsg.mask_first_token:
            token_mask = mask_first(token_mask)
        globals_ = self.global_rows(self.lsg.num_global_tokens, batch).to(hidden.dtype)
        hidden = torch.cat([globals_, hidden], dim=1)
        kwargs["attention_mask"] = EncoderMask(prepare_mask(token_mask, self.lsg.layout), length)
        return (hidden, *args[1:]), kwargs


class EncoderOutputTrim(LSGHook):
    """Encoder post-hook: global token 0 replaces the first token (pool_with_global), then globals and
    block padding are dropped so callers see exactly one row per input token."""

    def __init__(self, lsg: "LSGConfig") -> None:
        self.lsg = lsg

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        length = kwargs["attention_mask"].num_tokens
        hidden = output.last_hidden_state
        globals_count = self.lsg.num_global_tokens
        tokens = hidden[:, globals_count : globals_count + length]
        if self.lsg.pool_with_global:
            tokens = torch.cat([hidden[:, :1], tokens[:, 1:]], dim=1)
        output.last_hidden_state = tokens
        return output
