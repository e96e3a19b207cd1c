"""`with lsg_patch.enabled(**overrides):` — every `from_pretrained` inside the block returns an LSG model.

Rules (README "Loading inside enabled()"):
* A checkpoint whose config carries LSG settings (saved by lsg_patch or by the public LSG project) is rebuilt
  as saved: LSG attention is attached between model construction and weight loading, so transformers' own
  loader fills the saved global table and full-length position tables (nothing is re-initialised or tiled).
  The block's LSG options, then those given to `from_pretrained` itself (the LSG model cards'
  `num_global_tokens=16, block_size=64, ...`), override the saved settings; the block's max_length and seeding
  options are for plain checkpoints (a saved model keeps its length and its trained global tokens).
* A plain checkpoint is converted with `to_lsg(model, **overrides)` when the block gives `max_length`, with
  the block's options and then `from_pretrained`'s LSG options. Without `max_length` it is loaded unchanged
  (logged), and LSG options passed to its `from_pretrained` raise. A tokenizer loaded afterwards in the block from
  the same checkpoint gets `model_max_length = max_length`, as `to_lsg(tokenizer=...)` gives it (so a
  sentence-transformers folder converted on load gets that `max_seq_length`).
* `trust_remote_code=True` is accepted and replaced by False (logged once per process); code shipped with a
  checkpoint is never imported while a block is open.

Patches (wrapt) go on `PreTrainedModel.from_pretrained` — every Auto class ends there too —, on
`PreTrainedModel._load_pretrained_model` (the seam between building and loading), on
`PreTrainedTokenizerBase.from_pretrained`, and on transformers' `resolve_trust_remote_code` /
`get_class_in_module`. They are installed when the first block opens and all removed when the last one closes,
also when it raises; a transformers module imported meanwhile is cleaned too.

Threads: the block's settings live in a `contextvars.ContextVar`. While any block is open the patches are in
place process-wide, but they do nothing in threads (or contexts) that did not open a block themselves, so
another thread's `from_pretrained` behaves exactly as plain transformers. asyncio tasks created inside a block
inherit it. Nested blocks merge their options over the enclosing block's. Blocks of different threads may
close in any order. Note that transformers' own from_pretrained is not safe to run in several threads at once
(its model-init contexts, e.g. weight tying, are process-global); lsg_patch adds no such state.

`enable_for_process(**options)` (what `lsg-patch run` uses) is a block that every thread and context sees
(unless it opens its own block, which merges over it) and that is never closed.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import wrapt
from torch import nn

from .api import convert_with_options  # the public to_lsg: it also raises a given tokenizer's length
from .config import has_lsg_settings, option_names
from .architecture_inference import entry_for
from .options import ConversionOptions
from .persistence import drop_reference_code_map, model_class_for, saved_settings
from .sentence import set_tokenizer_length
from .swap import attach_saved_lsg, is_lsg_model
from .token_ids import check_tokenizer

logger = logging.getLogger("lsg_patch")

# Options the public LSG model cards pass to from_pretrained that are not LSGConfig fields.
CARD_DROPOUT = "attention_probs_dropout_prob"


@dataclass(frozen=True)
class _Block:
    options: ConversionOptions
    tokenizer: Any = None
    # checkpoints converted on load in this block (and the blocks nested in it): path -> max_length, for the
    # tokenizers loaded from them afterwards
    converted: dict[str, int] = field(default_factory=dict)


@dataclass
class _Load:
    """One outermost from_pretrained call inside a block."""

    block: _Block
    model_class: type
    kwargs_options: ConversionOptions  # the LSG options given to from_pretrained itself
    path_key: str
    seen: bool = False
    rebuilt: bool = False


_ACTIVE: contextvars.ContextVar[_Block | None] = contextvars.ContextVar("lsg_patch_enabled", default=None)
_LOADING: contextvars.ContextVar[_Load | None] = contextvars.ContextVar("lsg_patch_loading", default=None)
_LOCK = threading.Lock()
_OPEN_BLOCKS = 0
_INSTALLED: list["_Patch"] = []
_PROCESS_BLOCK: _Block | None = None  # enable_for_process(): seen where no block of the context's own is open
_REMOTE_CODE_NOTED = False  # the trust_remote_code notice is logged once per process


@contextlib.contextmanager
def enabled(max_length: int | None = None, **overrides: Any) -> Iterator[None]:
    """Inside the block, `from_pretrained` of any transformers model returns an LSG model (see module docstring).

    max_length: convert plain checkpoints to this length (without it they load unchanged).
    overrides: to_lsg's keywords (`ConversionOptions`' fields, and tokenizer): the LSG options (block_size,
    sparsity_type, ...) apply to every checkpoint loaded, saved LSG ones included; the seeding options
    (bos_token_id, mask_token_id, global_positional_stride, random_global_init, seed) and the tokenizer to plain
    checkpoints converted on load. Unknown names and invalid values raise here, before anything is patched.
    """
    outer = _current_block()
    block = _new_block(max_length, overrides, outer)
    _open()
    token = _ACTIVE.set(block)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _close()


def _new_block(max_length: Any, overrides: dict[str, Any], outer: _Block | None) -> _Block:
    overrides = dict(overrides)
    tokenizer = overrides.pop("tokenizer", None)
    check_tokenizer(tokenizer)
    options = ConversionOptions.from_mapping({"max_length": max_length, **overrides}, also_accepted=("tokenizer",))
    if outer is None:
        return _Block(options, tokenizer)
    return _Block(options.over(outer.options), tokenizer if tokenizer is not None else outer.tokenizer, outer.converted)


def enable_for_process(max_length: int | None = None, **overrides: Any) -> None:
    """`enabled()` for the whole process, every thread included, never closed: what `lsg-patch run` activates
    before a script's first line. Options as for `enabled()`; calling it again replaces them."""
    global _PROCESS_BLOCK
    block = _new_block(max_length, overrides, None)
    with _LOCK:
        if _PROCESS_BLOCK is None:
            _open_locked()
        _PROCESS_BLOCK = block


def check_enabled_options(max_length: int | None = None, **overrides: Any) -> None:
    """Raise the ValueError `enabled(max_length, **overrides)` would raise, without opening a block."""
    _new_block(max_length, overrides, None)


def _current_block() -> _Block | None:
    block = _ACTIVE.get()
    return block if block is not None else _PROCESS_BLOCK


def _open() -> None:
    with _LOCK:
        _open_locked()


def _open_locked() -> None:
    global _OPEN_BLOCKS
    if _OPEN_BLOCKS == 0:
        _install()
    _OPEN_BLOCKS += 1


def _close() -> None:
    global _OPEN_BLOCKS
    with _LOCK:
        _OPEN_BLOCKS -= 1
        if _OPEN_BLOCKS == 0:
            _uninstall()


# --- patches ---------------------------------------------------------------------------------------------


@dataclass
class _Patch:
    """One attribute replaced by a wrapt wrapper; `original` is what the owner's __dict__ held."""

    owner: Any
    name: str
    original: Any
    wrapper: Any = field(default=None)


def _install() -> None:
    from transformers import PreTrainedModel, dynamic_module_utils

    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    patches = [
        _wrap_class_attribute(PreTrainedModel, "from_pretrained", _from_pretrained_wrapper),
        _wrap_class_attribute(PreTrainedModel, "_load_pretrained_model", _load_wrapper),
        _wrap_class_attribute(PreTrainedTokenizerBase, "from_pretrained", _tokenizer_wrapper),
        _wrap_class_attribute(dynamic_module_utils, "get_class_in_module", _refuse_remote_code),
    ]
    resolve = dynamic_module_utils.resolve_trust_remote_code
    wrapper = wrapt.FunctionWrapper(resolve, _trust_remote_code_wrapper)
    for module in _transformers_modules():
        if module.__dict__.get("resolve_trust_remote_code") is resolve:
            patches.append(_Patch(module, "resolve_trust_remote_code", resolve, wrapper))
            setattr(module, "resolve_trust_remote_code", wrapper)
    _INSTALLED[:] = patches


def _uninstall() -> None:
    wrappers = {id(p.wrapper): p.original for p in _INSTALLED}
    for patch in reversed(_INSTALLED):
        if patch.owner.__dict__.get(patch.name) is patch.wrapper:
            setattr(patch.owner, patch.name, patch.original)
        else:
            logger.warning("lsg_patch: %s.%s was replaced by someone else while a block was open; left as is",
                           getattr(patch.owner, "__name__", patch.owner), patch.name)  # fmt: skip
    # transformers modules imported while the block was open may have bound a wrapper: give them the original.
    for module in _transformers_modules():
        for name, value in list(module.__dict__.items()):
            if id(value) in wrappers and isinstance(value, wrapt.FunctionWrapper):
                setattr(module, name, wrappers[id(value)])
    _INSTALLED.clear()


def _wrap_class_attribute(owner: Any, name: str, function: Callable) -> _Patch:
    original = owner.__dict__[name]
    wrapt.wrap_function_wrapper(owner, name, function)
    return _Patch(owner, name, original, owner.__dict__[name])


def _transformers_modules() -> list[Any]:
    return [m for n, m in list(sys.modules.items()) if m is not None and (n == "transformers" or n.startswith("transformers."))]


# --- wrappers (they do nothing unless the calling context opened a block) ---------------------------------


def _from_pretrained_wrapper(wrapped: Callable, model_class: Any, args: tuple, kwargs: dict) -> Any:
    block = _current_block()
    if block is None or _LOADING.get() is not None:  # outside any block, or a load nested in one being handled
        return wrapped(*args, **kwargs)
    kwargs_options = ConversionOptions.from_mapping({k: kwargs.pop(k) for k in option_names() if k in kwargs})
    if kwargs.get("trust_remote_code"):
        _note_remote_code()
        kwargs["trust_remote_code"] = False
    _absorb_card_dropout(model_class, kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    load = _Load(block, model_class, kwargs_options, _path_key(args[0] if args else kwargs.get("pretrained_model_name_or_path")))
    token = _LOADING.set(load)
    try:
        model, info = wrapped(*args, output_loading_info=True, **kwargs)
    finally:
        _LOADING.reset(token)
    _finish(model, info, load)
    return (model, info) if want_info else model


def _load_wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    load = _LOADING.get()
    if load is None or load.seen:
        return wrapped(*args, **kwargs)
    load.seen = True
    model = args[0] if args else kwargs["model"]
    saved = saved_settings(model.config)
    options = load.kwargs_options.over(load.block.options)
    if saved is not None:
        lsg = options.settings(saved)
        if lsg != saved:
            logger.info("lsg_patch: LSG options given (%s) override the saved settings of %s",
                        ", ".join(f"{k}={v!r}" for k, v in options.lsg_given().items()), type(model).__name__)  # fmt: skip
        if drop_reference_code_map(model.config):
            logger.info("lsg_patch: dropped the config's auto_map (it points at the LSG project's code, never run)")
        attach_saved_lsg(model, lsg)
        load.rebuilt = True
    elif options.max_length is None:
        if load.kwargs_options.given():
            raise ValueError(
                f"from_pretrained got LSG options ({', '.join(sorted(load.kwargs_options.given()))}) but "
                f"{model.config._name_or_path or 'the checkpoint'} is a plain checkpoint and the lsg_patch.enabled() "
                "block gives no max_length; use lsg_patch.enabled(max_length=...) to convert plain checkpoints"
            )
    else:  # validated now, before any weight is read
        entry_for(model)
        options.settings(None)
    return wrapped(*args, **kwargs)


def _finish(model: Any, info: dict[str, Any], load: _Load) -> None:
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if load.rebuilt:
        missing = [key for key in info.get("missing_keys", ()) if "global_embeddings" in key]
        if missing:
            raise ValueError(f"{name} has LSG settings but its weights lack {missing[0]}: the checkpoint is incomplete")
        logger.info("lsg_patch: rebuilt %s as an LSG model from the saved settings", type(model).__name__)
        return
    if not load.seen and saved_settings(model.config) is not None:
        raise RuntimeError(
            f"lsg_patch could not attach LSG attention while loading {name} (this transformers version did not "
            "load through PreTrainedModel._load_pretrained_model); the model would silently run without LSG"
        )
    options = load.kwargs_options.over(load.block.options)
    if options.max_length is None:
        logger.info("lsg_patch: %s is a plain checkpoint and enabled() got no max_length: loaded unchanged", name)
        return
    convert_with_options(model, options, load.block.tokenizer)
    assert is_lsg_model(model)
    if load.path_key:
        load.block.converted[load.path_key] = options.max_length


def _tokenizer_wrapper(wrapped: Callable, tokenizer_class: Any, args: tuple, kwargs: dict) -> Any:
    """A tokenizer loaded in a block from a checkpoint converted on load there gets the converted length."""
    tokenizer = wrapped(*args, **kwargs)
    block = _current_block()
    if block is None:
        return tokenizer
    length = block.converted.get(_path_key(args[0] if args else kwargs.get("pretrained_model_name_or_path")))
    current = getattr(tokenizer, "model_max_length", None)
    if length is not None and isinstance(current, int) and current < length:
        set_tokenizer_length(tokenizer, length)
        logger.info("lsg_patch: tokenizer model_max_length set to %d (its model was converted on load)", length)
    return tokenizer


def _path_key(path: Any) -> str:
    """How a checkpoint's path or id is recognised between a model and a tokenizer loaded from it."""
    if not isinstance(path, (str, os.PathLike)):
        return ""
    return os.path.abspath(path) if os.path.isdir(path) else str(path)


def _absorb_card_dropout(model_class: Any, kwargs: dict[str, Any]) -> None:
    """The LSG model cards pass attention_probs_dropout_prob also for families whose config has no such
    setting (BART), where the reference code ignored it: drop it there instead of failing in `__init__`."""
    if CARD_DROPOUT not in kwargs:
        return
    from transformers import PreTrainedConfig

    config = kwargs.get("config")
    config_class = getattr(model_class, "config_class", None)
    if isinstance(config, PreTrainedConfig):
        has_setting = hasattr(config, CARD_DROPOUT)
    else:
        has_setting = config_class is None or hasattr(config_class(), CARD_DROPOUT)
    if not has_setting:
        value = kwargs.pop(CARD_DROPOUT)
        logger.info("lsg_patch: %s=%r ignored: %s has no such setting", CARD_DROPOUT, value, model_class.__name__)


def _trust_remote_code_wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    if _current_block() is None:
        return wrapped(*args, **kwargs)
    trust, name, has_local_code, has_remote_code = _resolve_arguments(*args, **kwargs)
    if not trust:
        return wrapped(*args, **kwargs)
    _note_remote_code()
    if has_remote_code and not has_local_code:
        raise ValueError(
            f"{name} can only be loaded with its own code, and lsg_patch.enabled() never runs code from a checkpoint; "
            "lsg_patch rebuilds LSG checkpoints of supported model types with transformers' classes"
        )
    return False


def _resolve_arguments(
    trust_remote_code: Any, model_name: Any, has_local_code: bool, has_remote_code: bool, *rest: Any, **kwargs: Any
) -> tuple[Any, Any, bool, bool]:
    return trust_remote_code, model_name, has_local_code, has_remote_code


def _refuse_remote_code(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    if _current_block() is None:
        return wrapped(*args, **kwargs)
    raise RuntimeError("lsg_patch.enabled() refuses to import code shipped with a checkpoint (no remote code is run)")


def _note_remote_code() -> None:
    global _REMOTE_CODE_NOTED
    with _LOCK:
        first, _REMOTE_CODE_NOTED = not _REMOTE_CODE_NOTED, True
    if first:
        logger.warning(
            "lsg_patch.enabled(): trust_remote_code=True is ignored; no code from the checkpoint is run, "
            "LSG is applied by lsg_patch to transformers' own classes"
        )


# --- loading an LSG checkpoint in one call ------------------------------------------------------------------


def from_pretrained(path: str | os.PathLike, *model_args: Any, architecture: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a checkpoint as an LSG model with no remote code: lsg_patch or reference LSG checkpoints are rebuilt
    as saved; the class is `architecture`, else the config's (LSGBertForMaskedLM -> BertForMaskedLM).

    Keyword arguments go to `from_pretrained` as inside `lsg_patch.enabled()` (LSG options override the
    saved ones). A plain checkpoint raises: convert it with `to_lsg` or `enabled(max_length=...)`.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if not has_lsg_settings(config):
        raise ValueError(
            f"{path} is not an LSG checkpoint (its config has no block_size / sparsity_type / num_global_tokens); "
            "convert it with lsg_patch.to_lsg(model, max_length=...) or load it inside lsg_patch.enabled(max_length=...)"
        )
    model_class = model_class_for(config, architecture)
    kwargs.pop("trust_remote_code", None)
    with enabled():
        return model_class.from_pretrained(path, *model_args, **kwargs)
