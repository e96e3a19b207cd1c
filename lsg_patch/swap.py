"""Converting a transformers model and undoing it: validate everything, build every new tensor, then apply.

Nothing on the model changes until the plan is complete, so a bad argument or an unexpected model
layout raises with the model exactly as it was. Applying the plan is only attribute assignments: the model's
own copy of its config (other models built from the same config object are not touched), the position tables,
the global table, the "lsg" attention implementation selected for the converted self-attention modules (which
keep their class and parameters), and the family's forward hooks. The `PatchRecord` left on the base model is
the explicit marker of a converted model: it holds the hooks' handles and what `revert` needs.
The public functions (`to_lsg`, `from_lsg`, which also take a SentenceTransformer and a tokenizer) are in api.py.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import LSGConfig, option_names
from . import seam
from .global_tokens import GLOBAL_TABLE_ROWS, check_positional_stride, initial_global_table
from .hooks import recording_hooks, remove_hooks
from .architecture_inference import entry_for
from .options import ConversionOptions
from .positions import replace_embedding_weight, resize_index_buffers, sinusoidal_table, tiled_table
from .registry import ArchitectureEntry, FamilyAdapter
from .registry_paths import find_modules, get_submodule
from .token_ids import SeedTokens, check_token_ids, resolve_seed_tokens

logger = logging.getLogger("lsg_patch")

GLOBAL_EMBEDDINGS = "global_embeddings"
RECORD_ATTRIBUTE = "_lsg_patch"  # on the base model; pattern.py reads it too
# Written into model.config so that a checkpoint loaded without lsg_patch says what it needs.
LOAD_NOTE_KEY = "lsg_patch_note"
# The longest input of an LSG model whose positions have no table (rotary, relative_bias, none), kept in model.config.
MAX_LENGTH_KEY = "lsg_max_length"
LOAD_NOTE = (
    "LSG model saved by lsg_patch: load it inside `with lsg_patch.enabled():` or with lsg_patch.from_pretrained(path); "
    "plain transformers builds it with full attention and drops its global tokens (global_embeddings)"
)
# Position tables beyond this size are refused: a max_length that needs them is a typo, not a model to build.
MAX_POSITION_TABLE_BYTES = 16 * 2**30


@dataclass
class PatchRecord:
    """The marker of a converted model, kept on the base model as `_lsg_patch`, and what `revert` needs."""

    model_type: str
    entry: ArchitectureEntry
    lsg: LSGConfig
    max_length: int
    original_position_rows: int | None  # None: the model was already LSG when loaded, nothing to shrink back to
    original_max_position_embeddings: int | None
    hook_handles: list[RemovableHandle] = field(default_factory=list)
    # the tokenizer's (or SentenceTransformer's) length before the first conversion, given back by from_lsg
    original_input_length: int | None = None


@dataclass
class _Plan:
    base: nn.Module
    adapter: FamilyAdapter
    record: PatchRecord
    position_weights: dict[str, torch.Tensor]
    global_table: nn.Embedding | None
    attention_modules: list[nn.Module]
    sliding_modules: list[nn.Module]  # keep_sliding_window_layers: run "lsg_sliding"


def convert(model: nn.Module, options: ConversionOptions, tokenizer: Any = None) -> PatchRecord:
    """Convert a transformers model in place (or re-configure an LSG one) and return its record.

    On a model that is already LSG, the options given replace the current ones and the others stay (max_length
    included); the position table grows if max_length does; the trained global tokens are kept, so seeding
    options are refused there.
    """
    plan = _plan(model, options, tokenizer)
    _apply(plan, model)
    return plan.record


def record_of(model: nn.Module) -> PatchRecord | None:
    """The conversion record of a converted model, None for any other."""
    record = getattr(_base_model(model), RECORD_ATTRIBUTE, None)
    return record if isinstance(record, PatchRecord) else None


def is_lsg_model(model: nn.Module) -> bool:
    """True if lsg_patch converted this transformers model (its LSG attention is active)."""
    return record_of(model) is not None


def revert(model: nn.Module) -> PatchRecord:
    """Undo a conversion: hooks removed by their handles, the attention modules' previous implementation, no
    global table or LSG settings, the position table at its original size (for a conversion made in this process).
    Returns the record the model had. Nothing can fail once the first change is made."""
    record = record_of(model)
    if record is None:
        raise ValueError(f"this {type(model).__name__} is not an LSG model: there is nothing for from_lsg to undo")
    base, entry = _base_model(model), record.entry
    adapter = entry.adapter_instance(record.model_type)
    remove_hooks(record.hook_handles)
    adapter.remove(base, entry)
    for module in seam.selected_modules(base):
        seam.deselect(module)
    parent = get_submodule(base, entry.global_embeddings_parent)
    if hasattr(parent, GLOBAL_EMBEDDINGS):
        delattr(parent, GLOBAL_EMBEDDINGS)
    config = model.config
    if record.original_position_rows is not None:
        for path in _position_table_paths(entry):
            table = get_submodule(base, path)
            replace_embedding_weight(table, table.weight.detach()[: record.original_position_rows].clone())
            resize_index_buffers(get_submodule(base, _parent_path(path)), record.original_position_rows)
        config.max_position_embeddings = record.original_max_position_embeddings
    for key in (*option_names(), LOAD_NOTE_KEY, MAX_LENGTH_KEY):
        if key in config.__dict__:
            delattr(config, key)
    delattr(base, RECORD_ATTRIBUTE)
    return record


def reverted_input_length(record: PatchRecord) -> int | None:
    """The length a tokenizer should cut at once `record`'s conversion is undone: the one it had before, else the
    positions the shrunk table keeps; None when neither is known (the model keeps accepting its LSG length)."""
    if record.original_input_length is not None:
        return record.original_input_length
    if record.original_position_rows is not None:
        return record.original_position_rows - record.entry.position_offset
    return None


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
    if entry.has_position_table:
        max_length = get_submodule(base, entry.position_embeddings).weight.shape[0] - entry.position_offset
    else:
        max_length = getattr(model.config, MAX_LENGTH_KEY, None)
        if not isinstance(max_length, int):
            raise ValueError(f"this {model_type} LSG config has no {MAX_LENGTH_KEY!r}: it was not saved by lsg_patch")
    global_table = _empty_global_table(get_submodule(base, entry.word_embeddings).weight, base.training)
    attention, sliding = _attention_modules(entry, base)
    record = PatchRecord(model_type, entry, lsg, max_length, None, None)
    _apply(_Plan(base, entry.adapter_instance(model_type), record, {}, global_table, attention, sliding), model)
    return model


def _plan(model: nn.Module, options: ConversionOptions, tokenizer: Any) -> _Plan:
    model_type, entry = entry_for(model)
    base = _base_model(model)
    previous = record_of(model)
    if previous is not None and options.seeding_given():
        names = ", ".join(f"{name}={value!r}" for name, value in options.seeding_given().items())
        raise ValueError(
            f"{names}: these only seed new global tokens, and this {type(model).__name__} is already an LSG model "
            "that keeps its trained global tokens; to re-seed them, call lsg_patch.from_lsg(model) first, or leave "
            "them out to re-configure"
        )
    lsg = options.settings(previous.lsg if previous is not None else None)
    max_length = options.max_length_for(previous.max_length if previous is not None else None)
    position_weights = _grown_position_tables(model, base, entry, max_length)
    global_table = None
    if previous is None:
        global_table = _initial_global_embeddings(model, model_type, base, entry, tokenizer, options, lsg)
    attention, sliding = _attention_modules(entry, base)
    rows = get_submodule(base, entry.position_embeddings).weight.shape[0] if entry.has_position_table else None
    record = PatchRecord(
        model_type=model_type,
        entry=entry,
        lsg=lsg,
        max_length=max_length,
        original_position_rows=previous.original_position_rows if previous else rows,
        original_max_position_embeddings=(
            previous.original_max_position_embeddings if previous
            else getattr(model.config, "max_position_embeddings", None)  # T5 configs have none
        ),
        original_input_length=previous.original_input_length if previous else None,
    )
    adapter = entry.adapter_instance(model_type)
    return _Plan(base, adapter, record, position_weights, global_table, attention, sliding)


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
    paths = _position_table_paths(entry)
    _check_table_size(max_length, offset, [get_submodule(base, path).weight for path in paths])
    rows = max_length + offset
    weights = {}
    for path in paths:
        weight = get_submodule(base, path).weight.detach()
        if entry.position_kind == "sinusoidal":
            weights[path] = sinusoidal_table(rows, weight.shape[1], weight.dtype).to(weight.device)
        else:
            weights[path] = tiled_table(weight, rows, offset)
    return weights


def _check_table_size(max_length: int, offset: int, tables: list[torch.Tensor]) -> None:
    """Refuse a max_length whose position tables would exceed MAX_POSITION_TABLE_BYTES, before allocating them."""
    bytes_per_row = sum(table.shape[1] * table.element_size() for table in tables)
    if (max_length + offset) * bytes_per_row <= MAX_POSITION_TABLE_BYTES:
        return
    limit = MAX_POSITION_TABLE_BYTES // bytes_per_row - offset
    size = (max_length + offset) * bytes_per_row / 2**30
    raise ValueError(
        f"max_length={max_length} would need position tables of {size:,.0f} GiB ({len(tables)} table(s) of "
        f"{max_length + offset} rows); lsg_patch refuses tables over {MAX_POSITION_TABLE_BYTES // 2**30} GiB: "
        f"give max_length <= {limit}"
    )


def _seed_positions(base: nn.Module, entry: ArchitectureEntry) -> torch.Tensor:
    """The position vectors the global tokens are seeded with: the original table without its offset rows, or
    zeros where positions are not vectors added to the input (rotary, none)."""
    if entry.has_position_table:
        return get_submodule(base, entry.position_embeddings).weight[entry.position_offset :]
    words = get_submodule(base, entry.word_embeddings).weight
    return torch.zeros(GLOBAL_TABLE_ROWS, words.shape[1], dtype=words.dtype, device=words.device)


def _attention_modules(entry: ArchitectureEntry, base: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The distinct self-attention modules to run "lsg" (layers that share one, as ALBERT's, count once), and
    those to run "lsg_sliding" (under keep_sliding_window_layers, the ones with a `sliding_window`). That they can
    run LSG was checked by the resolver (`inference.check_entry_fits`)."""
    seam.register_with_transformers()  # process-wide and idempotent; refuses a foreign "lsg" before any change
    modules = list({id(module): module for _, _, module in find_modules(base, entry.self_attention)}.values())
    windowed = [entry.keep_sliding_window_layers and getattr(m, "sliding_window", None) is not None for m in modules]
    return [m for m, w in zip(modules, windowed) if not w], [m for m, w in zip(modules, windowed) if w]


def _apply(plan: _Plan, model: nn.Module) -> None:
    base, record = plan.base, plan.record
    entry = record.entry
    previous = record_of(model)
    if previous is None:
        _give_own_config(model)
    else:
        remove_hooks(previous.hook_handles)
    config = model.config
    if entry.has_position_table:
        # RoBERTa-likes count their offset rows in max_position_embeddings, BART-likes do not (their table has 2 more)
        table_rows = get_submodule(base, entry.position_embeddings).weight.shape[0]
        config.max_position_embeddings = record.max_length + entry.position_offset + config.max_position_embeddings - table_rows
    else:  # rotary models read max_position_embeddings for their scaling: it stays, the limit is stored apart
        setattr(config, MAX_LENGTH_KEY, record.max_length)
    for path, weight in plan.position_weights.items():
        replace_embedding_weight(get_submodule(base, path), weight)
        resize_index_buffers(get_submodule(base, _parent_path(path)), weight.shape[0])
    if plan.global_table is not None:
        setattr(get_submodule(base, entry.global_embeddings_parent), GLOBAL_EMBEDDINGS, plan.global_table)
    for index, module in enumerate(plan.attention_modules):
        seam.select(module, record.lsg.layout, lsh_seed=index)
    for module in plan.sliding_modules:
        seam.select_sliding(module)
    with recording_hooks() as handles:
        plan.adapter.install_hooks(base, entry, record.lsg, record.max_length)
    record.hook_handles = handles
    for key, value in record.lsg.config_entries(entry.encoder_decoder).items():
        setattr(config, key, value)
    setattr(config, LOAD_NOTE_KEY, LOAD_NOTE)
    setattr(base, RECORD_ATTRIBUTE, record)
    logger.info(
        "converted %s to LSG: max_length %d, %d attention modules (and %d sliding-window ones), %s",
        type(base).__name__, record.max_length, len(plan.attention_modules), len(plan.sliding_modules), record.lsg,
    )  # fmt: skip


def _give_own_config(model: nn.Module) -> None:
    """Point the model, and every module of it holding the same config object, at a copy: models built from one
    config object share it, and a conversion writes into it (max_position_embeddings, the LSG settings)."""
    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():
        if module.__dict__.get("config") is shared:
            module.config = own


def _initial_global_embeddings(
    model: nn.Module, model_type: str, base: nn.Module, entry: ArchitectureEntry, tokenizer: Any,
    options: ConversionOptions, lsg: LSGConfig,
) -> nn.Embedding:  # fmt: skip
    positions = _seed_positions(base, entry)
    words = get_submodule(base, entry.word_embeddings).weight
    seeds = resolve_seed_tokens(model, tokenizer, options.bos_token_id, options.mask_token_id)
    if entry.position_kind == "relative_bias" and seeds.bos_token_id is None and seeds.mask_token_id is None:
        # T5 has no bos, cls or mask token, and no position vectors to seed from: without these, every global
        # token would start as a zero vector
        config = model.config
        seeds = SeedTokens(config.eos_token_id, config.pad_token_id,
                           f"the config's eos (row 0) and pad (other rows) ids, as {seeds.source} gave none")
    init = options.global_init(seeds.bos_token_id, seeds.mask_token_id)
    check_positional_stride(init.global_positional_stride, positions.shape[0])
    check_token_ids(seeds, words.shape[0])
    token_type = get_submodule(base, entry.token_type_embeddings).weight[0] if entry.token_type_embeddings else None
    weight = initial_global_table(positions, words, token_type, init)
    vectors = "position vectors" if entry.has_position_table else f"no position vectors ({entry.position_kind} positions)"
    logger.info("global tokens seeded from %s, token ids from %s (bos id %s, mask id %s)", vectors, seeds.source,
                init.bos_token_id, init.mask_token_id)  # fmt: skip
    _warn_zero_global_tokens(weight[: lsg.num_global_tokens], model_type, entry, seeds)
    embedding = _empty_global_table(words, base.training)
    with torch.no_grad():
        embedding.weight.copy_(weight)
    return embedding


def _warn_zero_global_tokens(used: torch.Tensor, model_type: str, entry: ArchitectureEntry, seeds: SeedTokens) -> None:
    """Global tokens that start as zero vectors (no position vectors and no token id to add) work, but carry
    nothing until trained: say so, and how to seed them."""
    zero = [row for row in range(used.shape[0]) if not bool(used[row].any())]
    if zero:
        logger.warning(
            "lsg_patch: global token(s) %s of this %s model start as zero vectors: its %s positions have no vectors "
            "to seed from, and %s gave no token id for them; pass tokenizer=..., bos_token_id=/mask_token_id=, or "
            "random_global_init=True to seed them", zero, model_type, entry.position_kind, seeds.source,
        )  # fmt: skip


def _empty_global_table(words: torch.Tensor, training: bool) -> nn.Embedding:
    """The 512-row global table beside the word embeddings: same width, device, dtype and trainability."""
    embedding = nn.Embedding(GLOBAL_TABLE_ROWS, words.shape[1], device=words.device, dtype=words.dtype)
    embedding.weight.requires_grad_(words.requires_grad)
    return embedding.train(training)


def _position_table_paths(entry: ArchitectureEntry) -> tuple[str, ...]:
    return (entry.position_embeddings, *entry.tied_position_tables) if entry.has_position_table else ()


def _parent_path(path: str) -> str:
    return path.rpartition(".")[0]


def _base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)
