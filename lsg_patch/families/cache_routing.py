"""Which key/value cache a call of a causal LSG model uses, and where each row's tokens sit.

Causal LSG keeps its own cache (`LSGCache`); the hooks of causal families resolve the call's cache here: an LSGCache
is used as given, an empty transformers cache (what generate creates) is replaced by one, a filled one is refused,
and bidirectional encoders refuse every cache. Rows are placed with their real tokens first (`padding_last`), so a
row's block partition never depends on its padding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..attention.backends import exporting
from ..seam.lsg_cache import LSGCache
from .base import forward_parameters, get_argument

if TYPE_CHECKING:
    from ..config import LSGConfig

NO_CACHE = ("bidirectional LSG attention keeps no key/value cache (only causal stacks do: decoder-only LMs); call "
            "the model with use_cache=False")


EXPORT_NO_CACHE = ("generation with the LSGCache cannot be exported: the cache grows and is read by position at every "
                   "step, in Python. Export the forward without a cache (use_cache=False) and generate in PyTorch")


def cache_keyword(accepts: Any) -> str | None:
    """The model's cache argument: `cache` from transformers 5.24 on, `past_key_values` before."""
    return next((name for name in ("cache", "past_key_values") if name in accepts), None)


def given_cache(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The cache a call passed, under either name (5.24 still accepts the deprecated one), or by position."""
    given = kwargs.get("cache", kwargs.get("past_key_values"))
    name = cache_keyword(forward_parameters(module))
    if given is None and name:
        given = get_argument(module, args, kwargs, name)
    return given


def resolve_cache(module: nn.Module, args: tuple, kwargs: dict, lsg: "LSGConfig", causal: bool) -> LSGCache | None:
    """The LSGCache this call fills or reads, or None when it asks for no cache (use_cache, or the model config's
    default, as transformers reads it)."""
    given = given_cache(module, args, kwargs)
    accepts = forward_parameters(module)
    use_cache = get_argument(module, args, kwargs, "use_cache") if "use_cache" in accepts else None
    if not causal:
        if use_cache or given is not None:
            raise ValueError(NO_CACHE)
        return None
    if exporting():  # the exported forward is the one without a cache
        if use_cache or given is not None:
            raise ValueError(EXPORT_NO_CACHE)
        return None
    if isinstance(given, LSGCache):
        if given.layout is None:  # LSGCache(): made for whichever model it is passed to first
            given.bind(lsg.layout, lsg.mask_first_token)
        elif (given.layout, given.mask_first_token) != (lsg.layout, lsg.mask_first_token):
            raise ValueError(f"this LSGCache was made for another LSG layout ({given.layout}); this model runs "
                             f"{lsg.layout}: pass its own cache, or none")
        return given
    if given is not None:
        seen = given.get_seq_length() if hasattr(given, "get_seq_length") else None
        if seen != 0:
            raise ValueError(
                f"LSG attention cannot continue from a {type(given).__name__} holding {seen} tokens: its own cache "
                "(lsg_patch.LSGCache) keeps the compressed state LSG reads. Pass no cache (one is created), an "
                "LSGCache, or use_cache=False"
            )
        return LSGCache(lsg.layout, lsg.mask_first_token)
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False) and not (
            getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled())
    return LSGCache(lsg.layout, lsg.mask_first_token) if use_cache else None


def cache_arguments(module: nn.Module, kwargs: dict, cache: LSGCache | None) -> dict[str, Any]:
    """use_cache and the cache, under the forward's own name for it; a caller's other (deprecated) name for it is
    dropped from kwargs, so the model never sees two."""
    accepts = forward_parameters(module)
    changes: dict[str, Any] = {}
    if "use_cache" in accepts:
        changes["use_cache"] = cache is not None
    name = cache_keyword(accepts)
    if name:
        for other in {"cache", "past_key_values"} - {name}:
            kwargs.pop(other, None)
        changes[name] = cache
    return changes


def padding_last(token_mask: torch.Tensor) -> torch.Tensor | None:
    """(batch, T) order that puts each row's real tokens first, in their order, and its masked tokens after them;
    None when every row already is so (no padding, or right padding). Under torch.export always the order (the
    check reads data)."""
    if not exporting() and bool((token_mask[:, 1:] <= token_mask[:, :-1]).all()):
        return None
    return torch.argsort((~token_mask).to(torch.uint8), dim=1, stable=True)


def positions_after_gaps(given: torch.Tensor | None, token_mask: torch.Tensor) -> torch.Tensor | None:
    """Given (batch or 1, T) position ids, with every real token that follows padding after real tokens of its row
    (what generate appends to a right-padded prompt) numbered right after the row's real tokens before it, as a
    call after a cached prompt numbers it: generate numbers those tokens after the padding's position ids, which
    a cache never reads, so without this the same step would differ with and without a cache. Left padding
    (nothing real before it) and ids of rows without such a gap stay as given."""
    if given is None:
        return None
    seen_real = token_mask.cumsum(dim=1) > 0
    after_gap = (~token_mask & seen_real).cumsum(dim=1) > 0
    moved = token_mask & after_gap
    if not bool(moved.any()):
        return given
    given = given.expand(token_mask.shape[0], -1)
    before = given.masked_fill(~(token_mask & ~after_gap).to(given.device), -1).amax(dim=1, keepdim=True)
    continued = before + moved.cumsum(dim=1).to(given.device)
    return torch.where(moved.to(given.device), continued, given)


def take_rows(x: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
    """x (batch or 1, T, ...) with the T positions of every row taken in `order` (batch, T); None stays None."""
    if x is None:
        return None
    x = x.expand(order.shape[0], *x.shape[1:])
    index = order.view(*order.shape, *(1,) * (x.dim() - 2)).expand(*order.shape, *x.shape[2:])
    return x.gather(1, index.to(x.device))


def next_positions(given: torch.Tensor | None, real: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(batch,) position id after each row's last real token: offset + its count, or one past its given last."""
    if given is None:
        return real + offset
    last = given.expand(len(real), -1).gather(1, (real - 1).clamp(min=0).to(given.device)[:, None])[:, 0]
    return torch.where(real.to(last.device) > 0, last + 1, offset)


def new_tokens_are_real(module: nn.Module, args: tuple, kwargs: dict, new: int) -> None:
    """Refuse a mask that masks a token of a call after a cached prompt (padding belongs in the prompt)."""
    mask = get_argument(module, args, kwargs, "attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -new:].bool().all()):
        raise ValueError(
            "the attention mask masks some of the new tokens of a call that continues an LSGCache; every token "
            "after the prompt must be real (padding belongs in the prompt, where lsg_patch moves it behind each "
            "row's tokens). With generate's prefill_chunk_size, a padded batch needs all its padding in the first "
            "chunk: a larger chunk, or no chunking"
        )


def room_for(cache: LSGCache, new: int, max_length: int) -> None:
    """Refuse a call after a cached prompt that would take the sequence past max_length, as a whole input that
    long would be refused (and a learned position table ends there)."""
    if cache.columns + new > max_length:
        raise ValueError(
            f"this call would take the sequence to {cache.columns + new} tokens but this LSG model accepts at most "
            f"{max_length} (the max_length it was converted with); generate fewer tokens or convert with a larger "
            "max_length"
        )
