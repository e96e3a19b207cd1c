"""BERT, RoBERTa, CamemBERT, XLM-RoBERTa and ELECTRA: one encoder layout, one adapter.

Global tokens are embedded like tokens without word, position or type vectors (LayerNorm and dropout
only, then ELECTRA's projection), prepended to the embedding output; block padding appends zero
vectors (docs/LSG_SPEC.md sections 4, 5 and 7b).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import LSGHook
from ..registry_paths import get_submodule
from ..seam import CALL_KEYWORD
from .base import (NO_CACHE, FamilyAdapter, LengthCheck, OutputTrim, block_padding, build_call, cache_argument,
                   token_mask_from)

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


class BertFamily(FamilyAdapter):
    """Hooks on the embeddings (length check) and on the encoder (globals, padding, per-call state, trimming)."""

    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        LengthCheck(max_length).register_pre(get_submodule(base_model, entry.embeddings))
        encoder = get_submodule(base_model, entry.encoder)
        global_rows = BertGlobalRows(
            get_submodule(base_model, entry.embeddings), getattr(base_model, "embeddings_project", None)
        )
        BertEncoderInput(global_rows, lsg).register_pre(encoder)
        OutputTrim(lsg.num_global_tokens, lsg.pool_with_global).register_post(encoder)


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
    passed down to the layers as `lsg_call`; the encoder's dense mask is dropped."""

    def __init__(self, global_rows: BertGlobalRows, lsg: "LSGConfig") -> None:
        self.global_rows = global_rows
        self.lsg = lsg

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("use_cache") and cache_argument(kwargs) is not None:
            raise ValueError(NO_CACHE)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batch, length, _ = hidden.shape
        token_mask = token_mask_from(kwargs.get("attention_mask"), batch, length, hidden.device)
        padding = block_padding(length, self.lsg)
        if padding:  # F.pad, not cat with a new (batch, padding) tensor: no shape specialisation under compile
            hidden = F.pad(hidden, (0, 0, 0, padding))
            token_mask = F.pad(token_mask, (0, padding), value=False)
        globals_ = self.global_rows(self.lsg.num_global_tokens, batch).to(hidden.dtype)
        hidden = torch.cat([globals_, hidden], dim=1)
        kwargs["attention_mask"] = None
        kwargs[CALL_KEYWORD] = build_call(token_mask, length, self.lsg)
        return (hidden, *args[1:]), kwargs
