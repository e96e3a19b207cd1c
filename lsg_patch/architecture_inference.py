"""Entries for model types the registry does not name, inferred from the modules a loaded model contains.

Many transformers models copy a registered layout module for module (ERNIE is BERT's; Gemma, OLMo, Phi-3 are
Llama's; PLBart, Blenderbot and Marian are BART's or Pegasus'; Switch Transformers and Pop2Piano are T5's). A
layout is recognised from the module paths it needs, and from the attention modules: they must be transformers' own
classes (remote-code models report model types such as "bert" while running their own
attention, ALiBi for instance) and must look their implementation up in the AttentionInterface. The first
layout that fits gives the entry; when none does, the error names what was looked for and how to register().

The resolver lives here too: `entry_for(model)` finds the registered or inferred entry and checks that it fits the
model (every path it names exists, its attention modules can run LSG), the same checks `to_lsg` relies on, so
`architecture_support(model)` says "registered" only for models `to_lsg` accepts.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from .registry import CANNOT_SUPPORT, supported_architectures
from .registry import GPT2_LIKE, ROTARY_DECODER, ROTARY_ENCODER, ArchitectureEntry, bert_like_entry
from .registry import ALBERT_LIKE, DISTILBERT_LIKE, MODERNBERT_LIKE, T5_LIKE, bart_like_entry
from .positions import sinusoidal_table
from .registry_paths import find_modules, get_submodule
from .seam import routes_through_interface

logger = logging.getLogger("lsg_patch")


@dataclass(frozen=True)
class Layout:
    """A recognisable module layout: its name, the paths it needs beyond the entry's own, and its entry; unfit says
    why a model that has those paths still cannot take the entry (None: it can)."""

    name: str
    entry: ArchitectureEntry
    also_needs: tuple[str, ...] = ()
    unfit: str | None = None


def _layouts(base: nn.Module) -> list[Layout]:
    offset = _padding_offset(base, "embeddings.position_embeddings")
    # RoBERTa-likes (padding rows before the positions) seed their global tokens without token types, as the
    # registry's RoBERTa entries do
    token_types = _has(base, "embeddings.token_type_embeddings") and offset == 0
    return [
        Layout("Llama-like rotary stack (embed_tokens, layers.*.self_attn, rotary_emb)", ROTARY_DECODER, ("rotary_emb",)),
        Layout("GTE-like rotary encoder (embeddings.word_embeddings, layers.*.self_attn, rotary_emb)", ROTARY_ENCODER,
               ("rotary_emb",)),
        Layout("BERT-like encoder (embeddings.position_embeddings, encoder.layer.*.attention.self)",
               bert_like_entry(offset, token_types)),
        Layout("ModernBERT-like rotary encoder (embeddings.tok_embeddings, layers.*.attn, rotary_emb)", MODERNBERT_LIKE,
               ("rotary_emb",)),
        Layout("ALBERT-like encoder (embeddings, encoder.albert_layer_groups.*.albert_layers.*.attention)", ALBERT_LIKE),
        Layout("DistilBERT-like encoder (embeddings, transformer.layer.*.attention)", DISTILBERT_LIKE),
        Layout("GPT-2-like stack (wte, wpe, h.*.attn)", GPT2_LIKE),
        _bart_layout(base),
        Layout("T5-like encoder-decoder (encoder.embed_tokens, encoder.block.*.layer.0.SelfAttention, a relative "
               "position bias)", _t5_entry(base), ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",)),
    ]  # fmt: skip


def _bart_layout(base: nn.Module) -> Layout:
    """BART's paths, with what differs between its relatives read from the modules: a word embedding that scales
    itself (BART, PLBart, Blenderbot) or an encoder that scales it (Pegasus, Marian, BlenderbotSmall); a table that
    holds the sinusoidal values `positions.sinusoidal_table` regenerates (Pegasus, Marian) or a learned one, tiled
    after its `offset` rows (BART's 2)."""
    encoder = _module(base, "encoder")
    tokens, positions = _module(base, "encoder.embed_tokens"), _module(base, "encoder.embed_positions")
    scales_itself = hasattr(tokens, "embed_scale")
    unfit = None
    if positions is not None and not isinstance(positions, nn.Embedding):
        unfit = f"its encoder.embed_positions ({type(positions).__name__}) is not a position table (an nn.Embedding)"
    elif tokens is not None and not scales_itself and not isinstance(getattr(encoder, "embed_scale", None), (int, float)):
        unfit = "neither encoder.embed_tokens nor the encoder has an embed_scale, so the token scaling is unknown"
    sinusoidal = isinstance(positions, nn.Embedding) and _holds_sinusoids(positions.weight)
    offset = getattr(positions, "offset", 0)
    adapter = "lsg_patch.families.bart:" + ("BartFamily" if scales_itself else "PegasusFamily")
    entry = bart_like_entry(adapter, offset if isinstance(offset, int) else 0, sinusoidal, (), "")
    return Layout("BART-like encoder-decoder (shared, encoder.embed_positions, encoder.layers.*.self_attn)", entry,
                  ("encoder.embed_tokens",), unfit)


def _t5_entry(base: nn.Module) -> ArchitectureEntry:
    """T5's entry; UMT5's adapter when the self-attention takes no position_bias (every layer computes its own)."""
    attentions = find_modules(base, T5_LIKE.self_attention)
    if attentions and "position_bias" not in inspect.signature(attentions[0][2].forward).parameters:
        return replace(T5_LIKE, adapter="lsg_patch.families.t5:UMT5Family")
    return T5_LIKE


def _holds_sinusoids(weight: torch.Tensor) -> bool:
    """Whether a position table holds the Marian/Pegasus sinusoids (sin in the first half of the features)."""
    if weight.is_meta:
        return False
    expected = sinusoidal_table(weight.shape[0], weight.shape[1])
    return torch.allclose(weight.detach().float().cpu(), expected, atol=1e-4)


def infer_entry(model: nn.Module, model_type: str) -> ArchitectureEntry:
    """The entry of the first layout `model` fits, logged at INFO; a ValueError saying what was missing if none."""
    base = getattr(model, "base_model", model)
    misses = []
    for layout in _layouts(base):
        needed = dict.fromkeys((*layout.entry.module_paths().values(), *layout.also_needs))  # ordered, no repeats
        missing = [path for path in needed if path and not _present(base, path)]
        if missing:
            misses.append(f"{layout.name}: no {', '.join(repr(p) for p in missing)}")
            continue
        if layout.unfit:
            misses.append(f"{layout.name}: {layout.unfit}")
            continue
        foreign = _foreign_attention(base, layout.entry)
        if foreign:
            raise ValueError(
                f"model_type {model_type!r} ({type(model).__name__}) looks like a {layout.name}, but its attention "
                f"{foreign}; lsg_patch only runs LSG in attention modules that call transformers' AttentionInterface"
            )
        entry = replace(layout.entry, description=f"inferred: {layout.name}", heads=())
        logger.info("model_type %r is not registered; inferred its entry from its modules: %s", model_type, layout.name)
        return entry
    raise ValueError(
        f"model_type {model_type!r} ({type(model).__name__}) is not registered and its layout could not be inferred "
        f"({'; '.join(misses)}). Describe where its modules live with lsg_patch.register({model_type!r}, "
        "ArchitectureEntry(adapter=..., self_attention=..., position_embeddings=..., word_embeddings=...)); see the "
        "README, 'Adding an architecture'"
    )


def _foreign_attention(base: nn.Module, entry: ArchitectureEntry) -> str | None:
    """Why the layout's attention modules cannot run LSG, or None when they can."""
    for _, _, module in find_modules(base, entry.self_attention):
        if not type(module).__module__.startswith("transformers."):
            return f"class {type(module).__name__} comes from {type(module).__module__} (remote code)"
        if not routes_through_interface(module):
            return f"class {type(module).__name__} does not call ALL_ATTENTION_FUNCTIONS"
    return None


def _present(base: nn.Module, path: str) -> bool:
    return bool(find_modules(base, path)) if "*" in path else _has(base, path)


def _has(base: nn.Module, path: str) -> bool:
    return _module(base, path) is not None


def _module(base: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_submodule(base, path)
    except AttributeError:
        return None


def _padding_offset(base: nn.Module, path: str) -> int:
    """Leading rows of a learned table that are not positions: RoBERTa-likes keep padding_idx + 1 of them."""
    if not _has(base, path):
        return 0
    padding = getattr(get_submodule(base, path), "padding_idx", None)
    return 0 if padding is None else padding + 1


# --- the resolver -------------------------------------------------------------------------------------------


def entry_for(model: object) -> tuple[str, ArchitectureEntry]:
    """The model's model_type and entry (registered, else inferred), checked against the model; a ValueError says
    why lsg_patch cannot convert it (not a transformers model, refused type, unknown layout, missing module,
    attention that cannot run LSG) and lists the registered types."""
    registered = supported_architectures()
    supported = ", ".join(sorted(registered))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, nn.Module) or not model_type:
        raise ValueError(
            f"lsg_patch cannot convert a {type(model).__name__}: it is not a transformers model with a "
            f"config.model_type; supported model types: {supported}"
        )
    if model_type in CANNOT_SUPPORT and model_type not in registered:
        raise ValueError(f"model_type {model_type!r} ({type(model).__name__}) cannot take LSG attention: "
                         f"{CANNOT_SUPPORT[model_type]}")  # fmt: skip
    if model_type in registered:
        entry = registered[model_type]
    else:
        try:
            entry = infer_entry(model, model_type)
        except ValueError as error:
            raise ValueError(f"{error}. Registered model types: {supported}") from None
    check_entry_fits(model_type, entry, getattr(model, "base_model", model))
    return model_type, entry


def architecture_support(model: object) -> str:
    """How lsg_patch would convert `model`: "registered", or "inferred: <layout>" for an unregistered type whose
    layout was recognised; a ValueError says why it cannot (the same checks, and message, as `to_lsg`)."""
    model_type, entry = entry_for(model)
    return "registered" if model_type in supported_architectures() else entry.description


def check_entry_fits(model_type: str, entry: ArchitectureEntry, base: nn.Module) -> None:
    """Every path of the entry names a module of `base`, position tables have a weight, and every self-attention
    module looks its implementation up in transformers' AttentionInterface (a module that does not would silently
    keep dense attention after the conversion)."""
    for field_name, path in entry.module_paths().items():
        present = bool(find_modules(base, path)) if field_name == "self_attention" else _has(base, path)
        if not present:
            what = "matches" if field_name == "self_attention" else "names"
            raise ValueError(f"registry entry {model_type!r}: {field_name} path {path!r} {what} no module in "
                             f"{type(base).__name__}")  # fmt: skip
    for path in (entry.position_embeddings, *entry.tied_position_tables) if entry.has_position_table else ():
        if not isinstance(getattr(get_submodule(base, path), "weight", None), torch.Tensor):
            raise ValueError(f"registry entry {model_type!r}: {path!r} is not a position table with a weight")
    for _, _, module in find_modules(base, entry.self_attention):
        if not routes_through_interface(module):
            origin = type(module).__module__
            remote = "" if origin.startswith("transformers.") else f" (its class comes from {origin}: remote code)"
            raise ValueError(
                f"registry entry {model_type!r}: {type(module).__name__}{remote} (path {entry.self_attention!r}) does "
                "not call its attention through transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS[config."
                "_attn_implementation]), so LSG attention cannot run in it; lsg_patch supports attention modules "
                "that do"
            )
