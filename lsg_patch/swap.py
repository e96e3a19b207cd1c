"""to_lsg / from_lsg: validate everything, build every new tensor, then apply.

Nothing on the model changes until the plan is complete, so a bad argument or an unexpected model
layout raises with the model exactly as it was. Applying the plan is only attribute assignments: the
position tables, the global table, the "lsg" attention implementation selected for the converted
self-attention modules (which keep their class and parameters), and the family's forward hooks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import LSGConfig, option_names
from . import seam
from .families.base import FamilyAdapter
from .global_tokens import GLOBAL_TABLE_ROWS, GlobalInit, check_positional_stride, initial_global_table
from .hooks import has_lsg_hooks, remove_lsg_hooks
from .positions import replace_embedding_weight, resize_index_buffers, sinusoidal_table, tiled_table
from .registry import ArchitectureEntry, entry_for
from .registry_paths import find_modules, get_submodule
from .token_ids import SeedTokens, check_token_ids, resolve_seed_tokens

logger = logging.getLogger("lsg_patch")

GLOBAL_EMBEDDINGS = "global_embeddings"
# Written into model.config so that a checkpoint loaded without lsg_patch says what it needs.
LOAD_NOTE_KEY = "lsg_patch_note"
# The longest input of an LSG model whose positions have no table (rotary, relative_bias, none), kept in model.config.
MAX_LENGTH_KEY = "lsg_max_length"
LOAD_NOTE = (
    "LSG model saved by lsg_patch: load it inside `with lsg_patch.enabled():` or with lsg_patch.from_pretrained(path); "
    "plain transformers builds it with full attention and drops its global tokens (global_embeddings)"
)


@dataclass
class PatchRecord:
    """What `from_lsg` needs to undo a conversion; kept on the base model as `_lsg_patch`."""

    model_type: str
    lsg: LSGConfig
    max_length: int
    original_position_rows: int | None  # None: the model was already LSG when loaded, nothing to shrink back to
    original_max_position_embeddings: int | None


@dataclass
class _Plan:
    base: nn.Module
    entry: ArchitectureEntry
    adapter: FamilyAdapter
    lsg: LSGConfig
    max_length: int
    position_weights: dict[str, torch.Tensor]
    global_table: nn.Embedding | None
    attention_modules: list[nn.Module] = field(default_factory=list)
    sliding_modules: list[nn.Module] = field(default_factory=list)  # keep_sliding_window_layers: run "lsg_sliding"
    record: PatchRecord | None = None


def to_lsg(
    model: nn.Module,
    max_length: int = 4096,
    *,
    tokenizer: Any = None,
    bos_token_id: int | None = None,
    mask_token_id: int | None = None,
    global_positional_stride: int = 64,
    random_global_init: bool = False,
    seed: int = 0,
    **lsg_options: Any,
) -> nn.Module:
    """Turn a loaded transformers model into its LSG variant, in place, and return it.

    max_length: the number of tokens the model accepts afterwards (at least its current size).
    lsg_options: the LSG parameters of `LSGConfig` (block_size, sparsity_type, ...).
    tokenizer / bos_token_id / mask_token_id: the token ids that seed the global tokens (see README).
    On a model that is already LSG, the call re-configures it: given options replace the current ones,
    the position table grows if max_length does, and the trained global tokens are kept.
    """
    plan = _plan(
        model, max_length, tokenizer, bos_token_id, mask_token_id, global_positional_stride, random_global_init, seed,
        lsg_options,
    )  # fmt: skip
    _apply(plan, model.config)
    return model


def from_lsg(model: nn.Module) -> nn.Module:
    """Give the attention modules back their previous implementation, drop the global tokens and LSG settings,
    and shrink the position table to its original size (when lsg_patch made the conversion in this process)."""
    model_type, entry = entry_for(model)
    base = _base_model(model)
    if not is_lsg_model(model):
        raise ValueError(f"this {type(model).__name__} is not an LSG model: there is nothing for from_lsg to undo")
    record: PatchRecord | None = getattr(base, "_lsg_patch", None)
    remove_lsg_hooks(base)
    entry.adapter_instance(model_type).remove(base, entry)
    for module in seam.selected_modules(base):
        seam.deselect(module)
    parent = get_submodule(base, entry.global_embeddings_parent)
    if hasattr(parent, GLOBAL_EMBEDDINGS):
        delattr(parent, GLOBAL_EMBEDDINGS)
    config = model.config
    if record is not None and record.original_position_rows is not None:
        for path in _position_table_paths(entry):
            table = get_submodule(base, path)
            replace_embedding_weight(table, table.weight.detach()[: record.original_position_rows].clone())
            resize_index_buffers(get_submodule(base, _parent_path(path)), record.original_position_rows)
        config.max_position_embeddings = record.original_max_position_embeddings
    for key in (*option_names(), LOAD_NOTE_KEY, MAX_LENGTH_KEY):
        if key in config.__dict__:
            delattr(config, key)
    if hasattr(base, "_lsg_patch"):
        del base._lsg_patch
    return model


def is_lsg_model(model: nn.Module) -> bool:
    """True if lsg_patch's LSG attention is active on this model."""
    return has_lsg_hooks(_base_model(model))


def _plan(
    model: nn.Module,
    max_length: int,
    tokenizer: Any,
    bos_token_id: int | None,
    mask_token_id: int | None,
    stride: int,
    random_global_init: bool,
    seed: int,
    lsg_options: dict[str, Any],
) -> _Plan:
    model_type, entry = entry_for(model)
    base = _base_model(model)
    adapter = entry.adapter_instance(model_type)
    _check_paths(model_type, entry, base)
    already = is_lsg_model(model)
    current = _current_settings(base, model.config) if already else None
    lsg = LSGConfig.from_kwargs(current, **lsg_options)
    if not isinstance(random_global_init, bool):
        raise ValueError(f"random_global_init={random_global_init!r} is not accepted: it must be True or False")

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r} is not accepted: it must be a positive integer")
    position_weights = _grown_position_tables(model, base, entry, max_length)

    global_table = None
    if not already:
        global_table = _initial_global_embeddings(
            model, base, entry, _seed_positions(base, entry), tokenizer, bos_token_id, mask_token_id, stride,
            random_global_init, seed,
        )  # fmt: skip

    attention, sliding = _attention_modules(model_type, entry, base)

    previous: PatchRecord | None = getattr(base, "_lsg_patch", None)
    rows = get_submodule(base, entry.position_embeddings).weight.shape[0] if entry.has_position_table else None
    record = PatchRecord(
        model_type=model_type,
        lsg=lsg,
        max_length=max_length,
        original_position_rows=previous.original_position_rows if previous else rows,
        original_max_position_embeddings=(
            previous.original_max_position_embeddings if previous
            else getattr(model.config, "max_position_embeddings", None)  # T5 configs have none
        ),
    )
    return _Plan(base, entry, adapter, lsg, max_length, position_weights, global_table, attention, sliding, record)


def _grown_position_tables(model: nn.Module, base: nn.Module, entry: ArchitectureEntry, max_length: int
                           ) -> dict[str, torch.Tensor]:
    """The new weights of every position table at max_length (learned: tiled; sinusoidal: regenerated); none
    for position kinds without a table (rotary, none), where max_length only bounds the input."""
    if not entry.has_position_table:
        return {}
    offset = entry.position_offset
    current_length = get_submodule(base, entry.position_embeddings).weight.shape[0] - offset
    if max_length < current_length:
        raise ValueError(
            f"max_length={max_length} is below the {current_length} positions {type(model).__name__} already has; "
            f"give max_length >= {current_length}"
        )
    rows = max_length + offset
    weights = {}
    for path in _position_table_paths(entry):
        weight = get_submodule(base, path).weight.detach()
        if entry.position_kind == "sinusoidal":
            weights[path] = sinusoidal_table(rows, weight.shape[1], weight.dtype).to(weight.device)
        else:
            weights[path] = tiled_table(weight, rows, offset)
    return weights


def _seed_positions(base: nn.Module, entry: ArchitectureEntry) -> torch.Tensor:
    """The position vectors the global tokens are seeded with: the original table without its offset rows, or
    zeros where positions are not vectors added to the input (rotary, none)."""
    if entry.has_position_table:
        return get_submodule(base, entry.position_embeddings).weight[entry.position_offset :]
    words = get_submodule(base, entry.word_embeddings).weight
    return torch.zeros(GLOBAL_TABLE_ROWS, words.shape[1], dtype=words.dtype, device=words.device)


def attach_saved_lsg(model: nn.Module, lsg: LSGConfig) -> nn.Module:
    """Make a freshly built plain model LSG at its current length, before its weights are loaded.

    Used when loading a saved LSG checkpoint: the global table is created uninitialised (on the model's
    device, meta included) because its values come from the checkpoint, and the position tables are
    left as they are (already at the saved length).
    """
    model_type, entry = entry_for(model)
    base = _base_model(model)
    if is_lsg_model(model):
        raise ValueError(f"this {type(model).__name__} is already an LSG model")
    _check_paths(model_type, entry, base)
    adapter = entry.adapter_instance(model_type)
    if entry.has_position_table:
        max_length = get_submodule(base, entry.position_embeddings).weight.shape[0] - entry.position_offset
    else:
        max_length = getattr(model.config, MAX_LENGTH_KEY, None)
        if not isinstance(max_length, int):
            raise ValueError(f"this {model_type} LSG config has no {MAX_LENGTH_KEY!r}: it was not saved by lsg_patch")
    global_table = _empty_global_table(get_submodule(base, entry.word_embeddings).weight, base.training)
    attention, sliding = _attention_modules(model_type, entry, base)
    record = PatchRecord(model_type, lsg, max_length, None, None)
    _apply(_Plan(base, entry, adapter, lsg, max_length, {}, global_table, attention, sliding, record), model.config)
    return model


def _attention_modules(model_type: str, entry: ArchitectureEntry, base: nn.Module
                       ) -> tuple[list[nn.Module], list[nn.Module]]:
    """The distinct self-attention modules to run "lsg" (layers that share one, as ALBERT's, count once), and
    those to run "lsg_sliding" (under keep_sliding_window_layers, the ones with a `sliding_window`).

    Each must look its implementation up in transformers' AttentionInterface by its config: a module that does
    not would silently keep dense attention after the selection, so it is refused here, before any change.
    """
    seam.register_with_transformers()  # process-wide and idempotent; refuses a foreign "lsg" before any change
    modules = list({id(module): module for _, _, module in find_modules(base, entry.self_attention)}.values())
    for module in modules:
        if not seam.routes_through_interface(module):
            origin = type(module).__module__
            remote = "" if origin.startswith("transformers.") else f" (its class comes from {origin}: remote code)"
            raise ValueError(
                f"registry entry {model_type!r}: {type(module).__name__}{remote} (path {entry.self_attention!r}) does "
                "not call its attention through transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS[config."
                "_attn_implementation]), so LSG attention cannot run in it; lsg_patch supports attention modules "
                "that do"
            )
    windowed = [entry.keep_sliding_window_layers and getattr(m, "sliding_window", None) is not None for m in modules]
    return [m for m, w in zip(modules, windowed) if not w], [m for m, w in zip(modules, windowed) if w]


def _apply(plan: _Plan, config: Any) -> None:
    base, entry = plan.base, plan.entry
    remove_lsg_hooks(base)
    if entry.has_position_table:
        # RoBERTa-likes count their offset rows in max_position_embeddings, BART-likes do not (their table has 2 more)
        table_rows = get_submodule(base, entry.position_embeddings).weight.shape[0]
        config.max_position_embeddings = plan.max_length + entry.position_offset + config.max_position_embeddings - table_rows
    else:  # rotary models read max_position_embeddings for their scaling: it stays, the limit is stored apart
        setattr(config, MAX_LENGTH_KEY, plan.max_length)
    for path, weight in plan.position_weights.items():
        replace_embedding_weight(get_submodule(base, path), weight)
        resize_index_buffers(get_submodule(base, _parent_path(path)), weight.shape[0])
    if plan.global_table is not None:
        setattr(get_submodule(base, entry.global_embeddings_parent), GLOBAL_EMBEDDINGS, plan.global_table)
    for index, module in enumerate(plan.attention_modules):
        seam.select(module, plan.lsg.layout, lsh_seed=index)
    for module in plan.sliding_modules:
        seam.select_sliding(module)
    plan.adapter.install_hooks(base, entry, plan.lsg, plan.max_length)
    for key, value in plan.lsg.config_entries(entry.encoder_decoder).items():
        setattr(config, key, value)
    setattr(config, LOAD_NOTE_KEY, LOAD_NOTE)
    base._lsg_patch = plan.record
    logger.info(
        "converted %s to LSG: max_length %d, %d attention modules (and %d sliding-window ones), %s",
        type(base).__name__, plan.max_length, len(plan.attention_modules), len(plan.sliding_modules), plan.lsg,
    )  # fmt: skip


def _initial_global_embeddings(
    model: nn.Module,
    base: nn.Module,
    entry: ArchitectureEntry,
    positions: torch.Tensor,
    tokenizer: Any,
    bos_token_id: int | None,
    mask_token_id: int | None,
    stride: int,
    random_global_init: bool,
    seed: int,
) -> nn.Embedding:
    check_positional_stride(stride, positions.shape[0])
    words = get_submodule(base, entry.word_embeddings).weight
    seeds = resolve_seed_tokens(model, tokenizer, bos_token_id, mask_token_id)
    if entry.position_kind == "relative_bias" and seeds.bos_token_id is None and seeds.mask_token_id is None:
        # T5 has no bos, cls or mask token, and no position vectors to seed from: without these, every global
        # token would start as a zero vector
        config = model.config
        seeds = SeedTokens(config.eos_token_id, config.pad_token_id,
                           f"the config's eos (row 0) and pad (other rows) ids, as {seeds.source} gave none")
    check_token_ids(seeds, words.shape[0])
    token_type = get_submodule(base, entry.token_type_embeddings).weight[0] if entry.token_type_embeddings else None
    init = GlobalInit(seeds.bos_token_id, seeds.mask_token_id, stride, random_global_init, seed)
    weight = initial_global_table(positions, words, token_type, init)
    logger.info("global tokens seeded from %s (bos id %s, mask id %s)", seeds.source, init.bos_token_id, init.mask_token_id)
    embedding = _empty_global_table(words, base.training)
    with torch.no_grad():
        embedding.weight.copy_(weight)
    return embedding


def _empty_global_table(words: torch.Tensor, training: bool) -> nn.Embedding:
    """The 512-row global table beside the word embeddings: same width, device, dtype and trainability."""
    embedding = nn.Embedding(GLOBAL_TABLE_ROWS, words.shape[1], device=words.device, dtype=words.dtype)
    embedding.weight.requires_grad_(words.requires_grad)
    return embedding.train(training)


def _check_paths(model_type: str, entry: ArchitectureEntry, base: nn.Module) -> None:
    for field_name, path in entry.module_paths().items():
        if field_name == "self_attention":
            if not find_modules(base, path):
                raise ValueError(
                    f"registry entry {model_type!r}: self_attention path {path!r} matches no module in "
                    f"{type(base).__name__}"
                )
            continue
        try:
            get_submodule(base, path)
        except AttributeError:
            raise ValueError(
                f"registry entry {model_type!r}: {field_name} path {path!r} names no module in {type(base).__name__}"
            ) from None
    for path in _position_table_paths(entry):
        if not isinstance(getattr(get_submodule(base, path), "weight", None), torch.Tensor):
            raise ValueError(f"registry entry {model_type!r}: {path!r} is not a position table with a weight")


def _current_settings(base: nn.Module, config: Any) -> LSGConfig:
    record: PatchRecord | None = getattr(base, "_lsg_patch", None)
    return record.lsg if record is not None else LSGConfig.from_model_config(config)


def _position_table_paths(entry: ArchitectureEntry) -> tuple[str, ...]:
    return (entry.position_embeddings, *entry.tied_position_tables) if entry.has_position_table else ()


def _parent_path(path: str) -> str:
    return path.rpartition(".")[0]


def _base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)

