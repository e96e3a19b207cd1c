"""What every family shares: the small steps the family hooks are made of (mask recovery, block padding, building
the per-call state, length check). The adapter interface, FamilyAdapter, lives beside ArchitectureEntry in
lsg_patch.registry."""
from __future__ import annotations

import functools
import inspect
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import prepare_mask
from ..attention.backends import exporting
from ..hooks import LSGHook
from ..registry import FamilyAdapter  # the interface lives beside ArchitectureEntry; imported here for the families
from ..seam import CALL_KEYWORD, LSGCall

if TYPE_CHECKING:
    from ..config import LSGConfig


def token_mask_from(attention_mask: Any, batch: int, length: int, device: torch.device, causal: bool = False
                    ) -> torch.Tensor:
    """The (batch, length) bool key mask, True = may be attended, from a 2-D mask or a 4-D one in transformers'
    convention (bool: True = attend; float: additive, 0 = attend, the dtype's minimum or -inf = masked).

    LSG applies one key mask per row inside its own pattern, so a 4-D mask is accepted only when it is one:
    every real query row (and head) sees exactly the keys of its last row, the row's key mask (padding expanded to
    4-D, as transformers prepares it for bidirectional models), or, for causal models, exactly those of them up to
    its own position (a causal mask of a padded batch). Masks whose rows differ otherwise (packed documents, bands),
    other additive values (biases) and integer 4-D masks are refused rather than misread.
    """
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"lsg_patch cannot read an attention mask of type {type(attention_mask).__name__}; pass a 2-D 0/1 "
            "mask (batch, tokens), or a 4-D bool or additive float mask"
        )
    if attention_mask.dim() == 4:
        allowed = _rows_constant(_allowed_4d(attention_mask), causal)
    elif attention_mask.dim() == 2:
        allowed = attention_mask.bool()
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}; expected 2-D or 4-D")
    return allowed.expand(batch, length).to(device)


def _allowed_4d(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask as bool, True = attend (transformers' convention), or a ValueError naming what is wrong."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        allowed = mask == 0
        if not bool((allowed | (mask <= torch.finfo(mask.dtype).min)).all()):
            raise ValueError(
                "a 4-D float attention mask is additive in transformers; LSG attention only takes 0 (attend) "
                "and the dtype's minimum or -inf (masked), not other biases; pass a 2-D 0/1 or a 4-D bool mask"
            )
        return allowed
    raise ValueError(
        f"a 4-D attention mask of dtype {mask.dtype} is not accepted: transformers takes 4-D masks as bool "
        "(True = attend) or additive float; pass one of those, or a 2-D 0/1 mask"
    )


def _rows_constant(allowed: torch.Tensor, causal: bool) -> torch.Tensor:
    """The (batch, keys) key mask of a (batch, heads, queries, keys) bool mask whose query rows all see that key
    mask, its last row (up to each query's own position when causal); refuses any other mask. Rows that see no key,
    and rows of masked queries that see every key (padding rows some builders unmask), are outputs nobody reads."""
    keys = allowed[:, 0, -1, :]
    if exporting():  # an exported graph's mask input is 2-D, so a 4-D mask here is transformers' expansion of it
        return keys  # (a model called through .forward, as sentence-transformers does, skips the hook reading it)
    queries, length = allowed.shape[-2:]
    if queries != length:
        raise ValueError(f"a 4-D attention mask of {queries} query rows and {length} keys is not accepted; LSG "
                         "takes one row per token: pass a 2-D (batch, tokens) mask")
    expected = keys[:, None, None, :].expand_as(allowed)
    if causal:
        position = torch.arange(length, device=allowed.device)
        seen = position[None, :] <= position[:, None]  # (queries, keys)
        allowed, expected = allowed & seen, expected & seen
    unread = ~allowed.any(dim=-1) | (~keys[:, None, :] & allowed.all(dim=-1))
    if not bool(((allowed == expected).all(dim=-1) | unread).all()):
        raise ValueError(
            "this 4-D attention mask gives different query rows different keys (packed documents, a band or another "
            "per-query pattern); LSG applies one key mask per row inside its own local, sparse and global pattern and "
            "cannot apply it. Pass a 2-D (batch, tokens) mask, or a 4-D mask whose rows all equal the row's key mask"
            + (" (for this causal model: that mask with the causal pattern)" if causal else "")
            + "; run packed documents as separate rows"
        )
    return keys


def refuse_attention_weights(module: nn.Module, kwargs: dict) -> None:
    """Refuse output_attentions (asked by the call or set in the config): LSG layers never build the (n, n) weights
    a caller would get (transformers' sdpa layers quietly return none; a converted model says so instead)."""
    if kwargs.get("output_attentions", getattr(getattr(module, "config", None), "output_attentions", False)):
        raise ValueError(
            "output_attentions=True: LSG attention computes no attention weights (it never builds the (n, n) "
            "matrix); call the model with output_attentions=False (and set model.config.output_attentions=False). "
            "lsg_patch.attention_pattern(model, length) shows which keys each query attends to"
        )


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
    """Refuses, before any embedding lookup, inputs LSG cannot run: longer than max_length, without tokens or
    without rows, and given position ids past the position table (`table`, when the hooked module takes them)."""

    def __init__(self, max_length: int, table: nn.Module | None = None) -> None:
        self.max_length = max_length
        self.table = table

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensor = args[0] if args else kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
            shape = None if tensor is None else tuple(tensor.shape[:2])
        else:
            shape = tuple(tensor.shape)
        if shape is None:
            return
        if shape[-1] == 0:
            raise ValueError("the input has 0 tokens; LSG attention needs at least one token per row")
        if shape[0] == 0:
            raise ValueError(f"the input has 0 rows (shape {shape}); LSG attention needs at least one row")
        if shape[-1] > self.max_length:
            raise ValueError(
                f"the input has {shape[-1]} tokens but this LSG model accepts at most {self.max_length} "
                f"(the max_length it was converted with); truncate the input or convert with a larger max_length"
            )
        if self.table is not None and "position_ids" in forward_parameters(module):
            positions_in_table(get_argument(module, args, kwargs, "position_ids"), self.table.num_embeddings)


def positions_in_table(position_ids: Any, rows: int) -> None:
    """Refuse given position ids outside a table of `rows` rows, naming the value (an index error otherwise)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.numel() == 0:
        return
    low, high = int(position_ids.min()), int(position_ids.max())
    if low < 0 or high >= rows:
        raise ValueError(
            f"position_ids holds {high if high >= rows else low}, outside the position table of {rows} rows "
            f"(ids 0..{rows - 1}); give position ids inside the table (convert with a larger max_length to grow it)"
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
    table's only caller, the converted encoder or stack, always runs with the global rows in front).

    Tables that number their input by its shape (BART, mBART, Pegasus) are given the positions explicitly, the
    block padding past the table taking its last row: the padded rows are masked and trimmed, and the table
    covers max_length, not max_length rounded up to whole blocks. Index inputs (GPT-2) are position ids already
    (the stack hook gives its block padding the last token's position)."""

    def __init__(self, num_global_tokens: int) -> None:
        self.num_global_tokens = num_global_tokens

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not args or not _sees_globals(module):
            return None
        shape_source = args[0]  # BART/mBART pass a (batch, G+T) tensor, Pegasus the (batch, G+T) shape
        if "position_ids" in forward_parameters(module) and kwargs.get("position_ids") is None:
            shape = shape_source.shape if isinstance(shape_source, torch.Tensor) else shape_source
            tokens = shape[1] - self.num_global_tokens
            rows = module.num_embeddings - getattr(module, "offset", 0)
            positions = torch.arange(tokens, device=module.weight.device).clamp(max=rows - 1)
            return args, {**kwargs, "position_ids": positions}
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


def token_rows(hidden: torch.Tensor, count: int, length: int, row_order: torch.Tensor | None) -> torch.Tensor:
    """The caller's `length` token rows of an internal (batch, G + T + padding, width) tensor, in the caller's
    order (row_order: where each row's tokens were moved, see `cache_routing.padding_last`; None: not moved)."""
    return in_caller_order(hidden[:, count : count + length], row_order)


def in_caller_order(rows: torch.Tensor, row_order: torch.Tensor | None) -> torch.Tensor:
    if row_order is None:
        return rows
    index = row_order[..., None].expand_as(rows).to(rows.device)
    return torch.empty_like(rows).scatter(1, index, rows)


def _states_index(output: Any) -> Any:
    """Where `output` holds its hidden states (output_hidden_states): "hidden_states" of a ModelOutput, or the
    position of the tuple of tensors in a return_dict=False tuple; None if it holds none."""
    if isinstance(output, dict):
        return "hidden_states" if output.get("hidden_states") else None
    if isinstance(output, tuple):
        return next((i for i, x in enumerate(output) if i and isinstance(x, tuple) and x
                     and isinstance(x[0], torch.Tensor)), None)
    return None


def trimmed_hidden_states(output: Any, internal_rows: int, trim: Any, last: torch.Tensor | None = None) -> Any:
    """`output` with every hidden state of `internal_rows` rows (what the LSG stack computes on) replaced by
    trim(state): the caller's token rows, as the unconverted model returns them. last: what the final entry
    becomes when transformers tied it to the output (it then stays tied to the trimmed output)."""
    where = _states_index(output)
    if where is None:
        return output
    states = [trim(h) if isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[1] == internal_rows else h
              for h in output[where]]
    if last is not None:
        states[-1] = last
    if isinstance(output, tuple):
        return (*output[:where], tuple(states), *output[where + 1 :])
    output["hidden_states"] = tuple(states)
    return output


class OutputTrim(LSGHook):
    """Post-hook of the module that received [globals; tokens; block padding]: one output row per input token,
    with global token 0's row first under pool_with_global (docs/LSG_SPEC.md section 7b), or with the G global
    rows kept in front for a decoder's cross-attention (keep_globals). Hidden states (output_hidden_states) get
    the caller's token rows; an entry transformers ties to the output stays tied to it (the trimmed output),
    except where the output keeps the global rows."""

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
            kept = in_caller_order(hidden[:, : count + length], call.row_order)
        else:
            kept = hidden[:, count : count + length]
            if self.pool_with_global:
                kept = torch.cat([hidden[:, :1], kept[:, 1:]], dim=1)
            kept = in_caller_order(kept, call.row_order)
        where = _states_index(output)
        tied = where is not None and output[where][-1] is hidden and not self.keep_globals
        output = trimmed_hidden_states(output, hidden.shape[1], lambda h: token_rows(h, count, length, call.row_order),
                                       kept if tied else None)
        if isinstance(output, tuple):  # return_dict=False
            return (kept, *output[1:])
        output.last_hidden_state = kept
        return output
