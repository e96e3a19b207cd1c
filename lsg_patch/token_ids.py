"""Which token ids seed the global tokens, and where they came from (logged, so users can tell)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("lsg_patch")

TOKENIZER_ID_ATTRIBUTES = ("cls_token_id", "bos_token_id", "mask_token_id")


@dataclass(frozen=True)
class SeedTokens:
    """The BOS/CLS id added to global row 0 and the mask id added to the others; None = not added."""

    bos_token_id: int | None
    mask_token_id: int | None
    source: str


def resolve_seed_tokens(
    model: Any, tokenizer: Any = None, bos_token_id: int | None = None, mask_token_id: int | None = None
) -> SeedTokens:
    """Explicit ids, else the given tokenizer, else the config's ids, else the tokenizer saved with the
    model (offline only), else whatever ids the config has (the global tokens then start from the position
    vectors alone, or as zero vectors where positions have none: the conversion warns)."""
    if bos_token_id is not None or mask_token_id is not None:
        return SeedTokens(bos_token_id, mask_token_id, "the bos_token_id/mask_token_id arguments")
    if tokenizer is not None:
        return SeedTokens(*_tokenizer_ids(tokenizer), "the tokenizer argument")
    config = model.config
    config_bos = getattr(config, "bos_token_id", None)
    config_mask = getattr(config, "mask_token_id", None)
    if config_bos is not None and config_mask is not None:
        return SeedTokens(config_bos, config_mask, "the model config")
    saved = _saved_tokenizer(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", ""))
    if saved is not None:
        return SeedTokens(*_tokenizer_ids(saved), f"the tokenizer saved with the model ({config._name_or_path})")
    return SeedTokens(
        config_bos,
        config_mask,
        "no tokenizer (none given, none saved with the model)"
        + ("; the config's bos_token_id only" if config_bos is not None else ""),
    )


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse what is not a loaded tokenizer (a path, a number, ...) instead of falling back to a position-only
    seed with only a log line: a tokenizer is an object with a cls/bos/mask token id attribute."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, bytes, os.PathLike)):
        raise ValueError(
            f"tokenizer={tokenizer!r} is a path, not a tokenizer: pass the loaded tokenizer, "
            f"e.g. tokenizer=AutoTokenizer.from_pretrained({str(tokenizer)!r}), or None"
        )
    if not any(hasattr(tokenizer, name) for name in TOKENIZER_ID_ATTRIBUTES):
        raise ValueError(
            f"tokenizer={tokenizer!r} is not accepted: give a loaded transformers tokenizer (an object with "
            f"{', '.join(TOKENIZER_ID_ATTRIBUTES)}) or None"
        )


def check_token_ids(seed: SeedTokens, vocab_size: int) -> None:
    for name, value in (("bos_token_id", seed.bos_token_id), ("mask_token_id", seed.mask_token_id)):
        if value is not None and not (isinstance(value, int) and 0 <= value < vocab_size):
            raise ValueError(f"{name}={value!r} (from {seed.source}) is not a token id of this model (0..{vocab_size - 1})")


def _tokenizer_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "cls_token_id", None)
    return bos, getattr(tokenizer, "mask_token_id", None)


def _saved_tokenizer(path: str) -> Any:
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # any failure means "no usable tokenizer here"; the fallback is logged
        logger.debug("no tokenizer could be loaded offline from %s: %s", path, error)
        return None
