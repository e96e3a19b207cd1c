"""The public `to_lsg`: checks what `swap.to_lsg` cannot see, then keeps the objects around the model in step.

`swap.to_lsg` converts one transformers model atomically. Around it, a user holds a tokenizer (whose
`model_max_length` decides where `truncation=True` cuts) and possibly a sentence-transformers model (whose
`max_seq_length` does); leaving either at 512 silently truncates every long text. A model loaded by plain
transformers from an LSG checkpoint has lost its trained global tokens, and converting it again would also drop
its saved settings without a word. This module validates all of that before anything changes, then updates the
tokenizer and the sentence-transformers lengths once the conversion succeeded.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from . import swap
from .global_tokens import check_seed
from .persistence import saved_settings
from .sentence import set_max_seq_length, set_tokenizer_length, transformer_modules
from .token_ids import check_tokenizer

logger = logging.getLogger("lsg_patch")


def to_lsg(model: nn.Module, max_length: int = 4096, *, tokenizer: Any = None, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Turn a loaded transformers model, or a `SentenceTransformer`, into its LSG variant in place; return it.

    max_length: the number of tokens the model accepts afterwards (at least its current size); the tokenizer
    given (and a SentenceTransformer's own tokenizer and `max_seq_length`) is raised to it.
    Other keywords are those of `swap.to_lsg`: the LSG options (block_size, sparsity_type, ...),
    bos_token_id / mask_token_id, global_positional_stride, random_global_init.
    On a model that is already LSG, the call re-configures it (see README). Invalid input raises a ValueError
    with the model, the tokenizer and the SentenceTransformer unchanged.
    """
    check_tokenizer(tokenizer)
    check_seed(seed)
    inner, module = _unwrap(model)
    if module is not None and tokenizer is None:
        tokenizer = getattr(module, "tokenizer", None)
    _refuse_stripped_checkpoint(inner)
    swap.to_lsg(inner, max_length, tokenizer=tokenizer, seed=seed, **kwargs)
    if tokenizer is not None:
        set_tokenizer_length(tokenizer, max_length)
        logger.info("tokenizer model_max_length set to %d", max_length)
    if module is not None:
        set_max_seq_length(module, max_length)
        logger.info("SentenceTransformer max_seq_length set to %d", max_length)
    return model


def check_conversion_options(
    tokenizer: Any = None, seed: int = 0, random_global_init: bool = False, global_positional_stride: int = 64,
    bos_token_id: int | None = None, mask_token_id: int | None = None,
) -> None:
    """Check to_lsg's conversion keywords where they are given ahead of the model (`enabled(...)`,
    `lsg-patch run`), so a bad one fails there and not after a model was loaded. The checks that need the
    model (token ids against its vocabulary, the stride against its table) still run in to_lsg."""
    check_tokenizer(tokenizer)
    check_seed(seed)
    if not isinstance(random_global_init, bool):
        raise ValueError(f"random_global_init={random_global_init!r} is not accepted: it must be True or False")
    if isinstance(global_positional_stride, bool) or not isinstance(global_positional_stride, int) or global_positional_stride < 1:
        raise ValueError(f"global_positional_stride={global_positional_stride!r} is not accepted: it must be a positive integer")
    for name, value in (("bos_token_id", bos_token_id), ("mask_token_id", mask_token_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}={value!r} is not accepted: it must be a token id (an integer >= 0) or None")


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
