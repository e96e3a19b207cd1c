"""The public `to_lsg` / `from_lsg`: check what `swap` cannot see, then keep the objects around the model in step.

`swap` converts one transformers model atomically. Around it, a user holds a tokenizer (whose `model_max_length`
decides where `truncation=True` cuts) and possibly a sentence-transformers model (whose `max_seq_length` does);
leaving either at 512 silently truncates every long text, and leaving them at the LSG length after `from_lsg`
crashes the next long call. A model loaded by plain transformers from an LSG checkpoint has lost its trained global
tokens, and converting it again would also drop its saved settings without a word. This module validates all of that
before anything changes, then updates the tokenizer and the sentence-transformers lengths once the model's own
change succeeded.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from . import swap
from .options import ConversionOptions, refusing_unknown_options
from .persistence import saved_settings
from .sentence import set_max_seq_length, set_tokenizer_length, transformer_modules
from .token_ids import check_tokenizer

logger = logging.getLogger("lsg_patch")


@refusing_unknown_options
def to_lsg(
    model: nn.Module,
    max_length: int | None = None,
    *,
    tokenizer: Any = None,
    block_size: int | None = None,
    sparse_block_size: int | None = None,
    sparsity_factor: int | None = None,
    sparsity_type: str | None = None,
    num_global_tokens: int | None = None,
    mask_first_token: bool | None = None,
    pool_with_global: bool | None = None,
    adaptive: bool | None = None,
    lsh_num_pre_rounds: int | None = None,
    pass_global_tokens_to_decoder: bool | None = None,
    global_positional_stride: int | None = None,
    bos_token_id: int | None = None,
    mask_token_id: int | None = None,
    random_global_init: bool | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Turn a loaded transformers model, or a `SentenceTransformer`, into its LSG variant in place; return it.

    An option left None is not given: a first conversion takes its default (max_length 4096, the LSG options as in
    the README's table, global_positional_stride 64, random_global_init False, seed 0); on a model that is already
    LSG the current value stays (max_length included), the position table grows if max_length does, and the
    trained global tokens are kept (the seeding options global_positional_stride, bos_token_id, mask_token_id,
    random_global_init and seed are refused there).
    tokenizer: seeds the global tokens (with bos_token_id / mask_token_id, see README) and is raised to max_length,
    as are a SentenceTransformer's own tokenizer and `max_seq_length`.
    Invalid input raises a ValueError with the model, the tokenizer and the SentenceTransformer unchanged.
    """
    options = ConversionOptions(
        max_length=max_length, block_size=block_size, sparse_block_size=sparse_block_size,
        sparsity_factor=sparsity_factor, sparsity_type=sparsity_type, num_global_tokens=num_global_tokens,
        mask_first_token=mask_first_token, pool_with_global=pool_with_global, adaptive=adaptive,
        lsh_num_pre_rounds=lsh_num_pre_rounds, pass_global_tokens_to_decoder=pass_global_tokens_to_decoder,
        global_positional_stride=global_positional_stride, bos_token_id=bos_token_id, mask_token_id=mask_token_id,
        random_global_init=random_global_init, seed=seed,
    )  # fmt: skip
    return convert_with_options(model, options, tokenizer)


def convert_with_options(model: nn.Module, options: ConversionOptions, tokenizer: Any = None) -> nn.Module:
    """`to_lsg` with the options already gathered (what `enabled()` and the CLI call)."""
    check_tokenizer(tokenizer)
    inner, module = _unwrap(model)
    if module is not None and tokenizer is None:
        tokenizer = getattr(module, "tokenizer", None)
    _refuse_stripped_checkpoint(inner)
    before = _input_length(tokenizer, module)
    record = swap.convert(inner, options, tokenizer)
    if record.original_input_length is None:
        record.original_input_length = before
    if tokenizer is not None:
        set_tokenizer_length(tokenizer, record.max_length)
        logger.info("tokenizer model_max_length set to %d", record.max_length)
    if module is not None:
        set_max_seq_length(module, record.max_length)
        logger.info("SentenceTransformer max_seq_length set to %d", record.max_length)
    return model


def from_lsg(model: nn.Module, *, tokenizer: Any = None) -> nn.Module:
    """Undo `to_lsg` on what it took (a transformers model or a SentenceTransformer), in place; return it.

    The attention modules get their previous implementation back, the global tokens and LSG settings go, and the
    position table shrinks to its original size (for a conversion made in this process). The tokenizer given (and a
    SentenceTransformer's own tokenizer and `max_seq_length`) gets back the length it had before the conversion (or,
    when that is unknown, the positions the shrunk table keeps). Invalid input raises with nothing changed.
    """
    check_tokenizer(tokenizer)
    inner, module = _unwrap(model)
    if swap.record_of(inner) is None:
        raise ValueError(f"this {type(model).__name__} is not an LSG model: there is nothing for from_lsg to undo")
    record = swap.revert(inner)
    length = swap.reverted_input_length(record)
    if length is not None and tokenizer is not None:
        set_tokenizer_length(tokenizer, length)
    if length is not None and module is not None:
        set_max_seq_length(module, length)
    return model


def is_lsg_model(model: nn.Module) -> bool:
    """True if lsg_patch's LSG attention is active on this model (or on a SentenceTransformer's model)."""
    inner, _ = _unwrap(model)
    return swap.is_lsg_model(inner)


def _unwrap(model: Any) -> tuple[nn.Module, nn.Module | None]:
    """(transformers model, sentence-transformers Transformer module or None)."""
    modules = transformer_modules(model)
    if modules is None:
        return model, None
    if len(modules) != 1:
        raise ValueError(
            f"this {type(model).__name__} holds {len(modules)} Transformer modules; lsg_patch converts a "
            "SentenceTransformer with exactly one: convert its module's auto_model directly"
        )
    return modules[0].auto_model, modules[0]


def _input_length(tokenizer: Any, module: nn.Module | None) -> int | None:
    """Where text is cut before the conversion: the SentenceTransformer's max_seq_length, else the tokenizer's."""
    length = getattr(module, "max_seq_length", None) if module is not None else None
    if length is None and tokenizer is not None:
        length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and not isinstance(length, bool) else None


def _refuse_stripped_checkpoint(model: nn.Module) -> None:
    """A model whose config carries LSG settings but which is not LSG was loaded from an LSG checkpoint by plain
    transformers: its trained global tokens were dropped on load. Converting it would re-initialise them and
    replace its settings with the defaults, so it is refused."""
    if swap.is_lsg_model(model):
        return
    config = getattr(model, "config", None)
    if config is None or saved_settings(config) is None:
        return
    settings = saved_settings(config)
    source = getattr(config, "_name_or_path", "") or "its checkpoint"
    where = source if source and os.path.exists(source) else "path/to/checkpoint"
    raise ValueError(
        f"this {type(model).__name__} was loaded from an LSG checkpoint ({source}: block_size={settings.block_size}, "
        f"sparsity_type={settings.sparsity_type!r}, num_global_tokens={settings.num_global_tokens}) by plain "
        "transformers, which dropped its trained global tokens; to_lsg would replace them and these settings. "
        f"Load it as an LSG model instead: lsg_patch.from_pretrained({where!r}), or from_pretrained inside "
        "`with lsg_patch.enabled():`"
    )
