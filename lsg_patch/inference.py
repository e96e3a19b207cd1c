"""Entries for model types the registry does not name, inferred from the modules a loaded model contains.

Many transformers models copy a registered layout module for module (ERNIE is BERT's; Gemma, OLMo, Phi-3 are
Llama's). A layout is recognised from the module paths it needs, and from the attention modules: they must be
transformers' own classes (remote-code models report model types such as "bert" while running their own
attention, ALiBi for instance) and must look their implementation up in the AttentionInterface. The first
layout that fits gives the entry; when none does, the error names what was looked for and how to register().
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from torch import nn

from .registry import GPT2_LIKE, ROTARY_DECODER, ROTARY_ENCODER, ArchitectureEntry, bert_like_entry
from .registry_paths import find_modules, get_submodule
from .seam import routes_through_interface

logger = logging.getLogger("lsg_patch")


@dataclass(frozen=True)
class Layout:
    """A recognisable module layout: its name, the paths it needs beyond the entry's own, and its entry."""

    name: str
    entry: ArchitectureEntry
    also_needs: tuple[str, ...] = ()


def _layouts(base: nn.Module) -> list[Layout]:
    offset = _padding_offset(base, "embeddings.position_embeddings")
    token_types = _has(base, "embeddings.token_type_embeddings")
    return [
        Layout("Llama-like rotary stack (embed_tokens, layers.*.self_attn, rotary_emb)", ROTARY_DECODER, ("rotary_emb",)),
        Layout("GTE-like rotary encoder (embeddings.word_embeddings, layers.*.self_attn, rotary_emb)", ROTARY_ENCODER,
               ("rotary_emb",)),
        Layout("BERT-like encoder (embeddings.position_embeddings, encoder.layer.*.attention.self)",
               bert_like_entry(offset, token_types)),
        Layout("GPT-2-like stack (wte, wpe, h.*.attn)", GPT2_LIKE),
    ]  # fmt: skip


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
    try:
        get_submodule(base, path)
    except AttributeError:
        return False
    return True


def _padding_offset(base: nn.Module, path: str) -> int:
    """Leading rows of a learned table that are not positions: RoBERTa-likes keep padding_idx + 1 of them."""
    if not _has(base, path):
        return 0
    padding = getattr(get_submodule(base, path), "padding_idx", None)
    return 0 if padding is None else padding + 1
