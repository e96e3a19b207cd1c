"""What every family shares: the adapter interface and the small steps the family hooks are made of (mask
recovery, block padding, building the per-call state, length check)."""
from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import prepare_mask
from ..attention.backends import exporting
from ..hooks import LSGHook
from ..seam import CALL_KEYWORD, LSGCall

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


class FamilyAdapter(ABC):
    """The forward-time behaviour of one family, installed as LSGHooks on the host modules: global tokens in,
    block padding, the per-call LSG state, trimmed outputs. The attention modules themselves stay the host's."""

    @abstractmethod
    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        """Register the hooks that prepend global tokens, pad to blocks, build the mask and trim outputs."""

    def remove(self, base_model: nn.Module, entry: "ArchitectureEntry") -> None:
        """Undo what install_hooks changed besides its LSGHooks (which `remove_lsg_hooks` finds); most families
        change nothing else."""


def token_mask_from(attention_mask: Any, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The (batch, length) bool key mask, True = may be attended, from any mask transformers builds.

    transformers hands the encoder None (nothing masked), a 2-D 0/1 mask, or a 4-D mask whose last query row
    sees every non-padded key (also for causal masks). A 4-D mask follows transformers' convention: bool means
    True = attend; a float mask is additive (0 = attend, the dtype's minimum or -inf = masked). LSG can apply
    neither other additive values (biases) nor integer 4-D masks, so those are refused rather than misread.
    """
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"lsg_patch cannot read an attention mask of type {type(attention_mask).__name__}; pass a 2-D 0/1 "
            "mask (batch, tokens), or a 4-D bool or additive float mask"
        )
    if attention_mask.dim() == 4:
        rows = attention_mask[:, 0, -1, :]
        if rows.dtype == torch.bool:
            allowed = rows
        elif rows.is_floating_point():
            allowed = rows == 0
            if not bool((allowed | (rows <= torch.finfo(rows.dtype).min)).all()):
                raise ValueError(
                    "a 4-D float attention mask is additive in transformers; LSG attention only takes 0 (attend) "
                    "and the dtype's minimum or -inf (masked), not other biases; pass a 2-D 0/1 or a 4-D bool mask"
                )
        else:
            raise ValueError(
                f"a 4-D attention mask of dtype {rows.dtype} is not accepted: transformers takes 4-D masks as bool "
                "(True = attend) or additive float; pass one of those, or a 2-D 0/1 mask"
            )
    elif attention_mask.dim() == 2:
        allowed = attention_mask.bool()
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}; expected 2-D or 4-D")
    return allowed.expand(batch, length).to(device)


def forward_parameters(module: nn.Module) -> tuple[str, ...]:
    """The names of `module.forward`'s parameters, in order (looked up once per forward function: hooks ask on
    every call, and a generated token is a call)."""
    forward = module.forward
    return _parameters(getattr(forward, "__func__", forward), hasattr(forward, "__func__"))


@functools.lru_cache(maxsize=256)
def _parameters(function: Any, bound: bool) -> tuple[str, ...]:
    names = tuple(inspect.signature(function).parameters)
    return names[1:] if bound else names  # a bound method's signature has no self


def _position(module: nn.Module, name: str) -> int:
    return forward_parameters(module).index(name)


def get_argument(module: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """One argument of a module call, whether the caller passed it by position or by keyword."""
    index = _position(module, name)
    return args[index] if index < len(args) else kwargs.get(name)


def token_inputs(module: nn.Module, args: tuple, kwargs: dict
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """input_ids, inputs_embeds, and the (batch, tokens) tensor of whichever the call gave (None: neither)."""
    input_ids = get_argument(module, args, kwargs, "input_ids")
    embeds = get_argument(module, args, kwargs, "inputs_embeds")
    reference = input_ids if input_ids is not None else (None if embeds is None else embeds[..., 0])
    return input_ids, embeds, reference


def set_argument(module: nn.Module, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """Replace one argument where the caller put it: transformers' forward wrappers expect their keyword
    arguments to stay keywords."""
    index = _position(module, name)
    if index < len(args):
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


def block_padding(length: int, lsg: "LSGConfig") -> int:
    """How many masked positions adaptive padding appends (docs/LSG_SPEC.md section 5). Under torch.export, up to
    whole blocks at every length (the exported graph always takes the block path), as a symbolic size that callers
    apply with `pad_tokens` whatever its value (a branch on it would fix the length)."""
    if exporting():
        if not lsg.adaptive:
            raise ValueError("a model converted with adaptive=False refuses lengths that are not whole blocks, which "
                             "an exported graph cannot check: convert with adaptive=True to export it")
        return lsg.block_size * ((length + lsg.block_size - 1) // lsg.block_size) - length
    if length <= 2 * lsg.block_size or length % lsg.block_size == 0:
        return 0
    if not lsg.adaptive:
        raise ValueError(
            f"an input of {length} tokens is not a multiple of block_size={lsg.block_size}; pad it to a multiple "
            f"of {lsg.block_size}, or convert with adaptive=True to let lsg_patch pad it"
        )
    return lsg.block_size - length % lsg.block_size


def pad_tokens(x: torch.Tensor, padding: int, value: float | bool = 0) -> torch.Tensor:
    """x (batch, T, ...) with `padding` rows of `value` appended along dim 1 (x itself when there are none).

    Under torch.export the rows are written into a tensor of T + padding rows (index_copy): its size, whole blocks,
    is one the tracer can cut into blocks, where F.pad's would need a proof that the padding is >= 0."""
    if exporting():
        tokens = x.shape[1]
        padded = x.new_full((x.shape[0], tokens + padding, *x.shape[2:]), value)
        return padded.index_copy(1, torch.arange(tokens, device=x.device), x)
    if not padding:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, padding), value=value)


def mask_first(token_mask: torch.Tensor) -> torch.Tensor:
    """A copy of the key mask with token 0 masked (mask_first_token); the caller's tensors stay intact."""
    return torch.cat([torch.zeros_like(token_mask[:, :1]), token_mask[:, 1:]], dim=1)


def build_call(token_mask: torch.Tensor, num_tokens: int, lsg: "LSGConfig") -> LSGCall:
    """The per-call state of one forward: token_mask covers the block-padded tokens; mask_first_token is applied
    to a copy, for the LSG layers."""
    lsg_tokens = mask_first(token_mask) if lsg.mask_first_token else token_mask
    return LSGCall(prepare_mask(lsg_tokens, lsg.layout), lsg.layout, num_tokens, token_mask)


class LengthCheck(LSGHook):
    """Refuses inputs longer than max_length before they reach an embedding lookup."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensor = args[0] if args else kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
            length = None if tensor is None else tensor.shape[1]
        else:
            length = tensor.shape[-1]
        if length == 0:
            raise ValueError("the input has 0 tokens; LSG attention needs at least one token per row")
        if length is not None and length > self.max_length:
            raise ValueError(
                f"the input has {length} tokens but this LSG model accepts at most {self.max_length} "
                f"(the max_length it was converted with); truncate the input or convert with a larger max_length"
            )


# The position table (by id) of the causal stack whose current call, in this thread, continues a cached prompt:
# its input has no global rows in front. Set by the stack hook at the start of every call, so never stale when read.
_TABLE_WITHOUT_GLOBALS: ContextVar[int | None] = ContextVar("lsg_table_without_globals", default=None)


def tables_see_globals(table: nn.Module | None, with_globals: bool) -> None:
    """Tell `table`'s hooks whether this call's input has the global rows in front (the stack hook calls this)."""
    if table is not None:
        _TABLE_WITHOUT_GLOBALS.set(None if with_globals else id(table))


def _sees_globals(table: nn.Module) -> bool:
    return _TABLE_WITHOUT_GLOBALS.get() != id(table)


class TokenPositionsOnly(LSGHook):
    """Position-table pre-hook: look positions up for the T tokens, not for the G global rows in front (the
    table's only caller, the converted encoder or stack, always runs with the global rows in front)."""

    def __init__(self, num_global_tokens: int) -> None:
        self.num_global_tokens = num_global_tokens

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not args or not _sees_globals(module):
            return None
        shape_source = args[0]  # BART/mBART pass a (batch, G+T) tensor, Pegasus the (batch, G+T) shape
        if isinstance(shape_source, torch.Tensor):
            tokens_only = shape_source[:, self.num_global_tokens :]
        else:
            tokens_only = (shape_source[0], shape_source[1] - self.num_global_tokens)
        return (tokens_only, *args[1:]), kwargs


class NoPositionForGlobals(LSGHook):
    """Position-table post-hook: zero rows in front for the globals, which get no position (spec section 4)."""

    def __init__(self, num_global_tokens: int) -> None:
        self.num_global_tokens = num_global_tokens

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if not _sees_globals(module):
            return None
        zeros = output.new_zeros(*output.shape[:-2], self.num_global_tokens, output.shape[-1])
        return torch.cat([zeros, output], dim=-2)


def with_global_rows(table: nn.Embedding, embeds: torch.Tensor, count: int) -> torch.Tensor:
    """[the first `count` rows of the global table; embeds] for every batch row, in the embeddings' dtype."""
    rows = table.weight[:count].to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
    return torch.cat([rows, embeds], dim=1)


class OutputTrim(LSGHook):
    """Post-hook of the module that received [globals; tokens; block padding]: one output row per input token,
    with global token 0's row first under pool_with_global (docs/LSG_SPEC.md section 7b), or with the G global
    rows kept in front for a decoder's cross-attention (keep_globals)."""

    def __init__(self, num_global_tokens: int, pool_with_global: bool, keep_globals: bool = False) -> None:
        self.num_global_tokens = num_global_tokens
        self.pool_with_global = pool_with_global
        self.keep_globals = keep_globals

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = kwargs[CALL_KEYWORD]
        if call.continues:  # tokens after a cached prompt: one row each already
            return output
        length = call.num_tokens
        hidden = output[0]
        count = self.num_global_tokens
        if exporting():  # rows by index: a slice's size would be min(length, padded length), unprovably length
            hidden = hidden.index_select(1, torch.arange(count + length, device=hidden.device))
        if self.keep_globals:
            kept = hidden[:, : count + length]
        else:
            kept = hidden[:, count : count + length]
            if self.pool_with_global:
                kept = torch.cat([hidden[:, :1], kept[:, 1:]], dim=1)
        if call.row_order is not None:  # rows back in the caller's order (their padding was moved behind them)
            index = call.row_order[..., None].expand_as(kept).to(kept.device)
            kept = torch.empty_like(kept).scatter(1, index, kept)
        if isinstance(output, tuple):  # return_dict=False
            return (kept, *output[1:])
        output.last_hidden_state = kept
        return output
