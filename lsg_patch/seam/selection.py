"""Selecting "lsg" for chosen attention modules only, and giving them back their implementation.

transformers' attention modules look their implementation up in `self.config._attn_implementation`, and
the config object is shared by every module of a model (cross-attention and decoders included). A converted
module therefore gets a view of the model's config (`SelectedConfig`) that answers "lsg" (or "lsg_sliding" for
the sliding-window layers of a model that keeps them, see `seam.sliding`) for the attention implementation and
reads everything else from the model's config, which stays unchanged: other modules keep
their implementation bit for bit, later changes to the model's config still reach the converted modules, and
`deselect` hands back the original config object. `print(model)` shows which modules run LSG and how.
"""
from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

from torch import nn

from ..attention import AttentionLayout
from .interface import ATTENTION_NAME
from .sliding import SLIDING_ATTENTION_NAME

_ORIGINAL = "_lsg_original"


class SelectedConfig:
    """A converted attention module's `config`: the model's config, with "lsg" (or "lsg_sliding") as attention
    implementation.

    lsh_seed: the seed of an LSG module's lsh hyperplanes (its position among the converted modules), so that
    layers hash differently, and each the same way on every call; sliding-window modules have none.
    """

    def __init__(self, original: Any, lsh_seed: int | None, implementation: str = ATTENTION_NAME) -> None:
        self.__dict__[_ORIGINAL] = original
        self.__dict__["_attn_implementation"] = implementation
        if lsh_seed is not None:
            self.__dict__["lsh_seed"] = lsh_seed

    def __getattr__(self, name: str) -> Any:
        original = self.__dict__.get(_ORIGINAL)
        if original is None:  # during copy/unpickling, before the original is set
            raise AttributeError(name)
        return getattr(original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__[_ORIGINAL], name, value)

    def __repr__(self) -> str:
        return f"SelectedConfig({self._attn_implementation!r} over {type(self.__dict__[_ORIGINAL]).__name__})"


def routes_through_interface(module: nn.Module) -> bool:
    """Whether the module's forward looks its attention up in transformers' AttentionInterface by
    `self.config._attn_implementation` (read from the source of its own forward, not of its whole file as
    transformers' `_can_set_attn_implementation` does)."""
    if not hasattr(module, "config"):
        return False
    try:
        source = inspect.getsource(inspect.unwrap(type(module).forward))
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source and "config._attn_implementation" in source


class _LSGExtraRepr:
    """What a selected module's `extra_repr` returns: its own text plus its LSG settings (picklable)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self) -> str:
        return self.text


def select(module: nn.Module, layout: AttentionLayout, lsh_seed: int) -> None:
    """Make `module` run "lsg" (hashing with `lsh_seed` if its layout is lsh); print(model) shows it with its
    layout. Re-selecting a selected module only updates what is shown."""
    settings = ", ".join(f"{f.name}={getattr(layout, f.name)!r}" for f in fields(layout))
    own = type(module).extra_repr(module)
    module.extra_repr = _LSGExtraRepr(", ".join(filter(None, [own, f"attn_implementation='lsg', {settings}"])))
    if not is_selected(module):
        module.config = SelectedConfig(module.config, lsh_seed)


def select_sliding(module: nn.Module) -> None:
    """Make a sliding-window module run "lsg_sliding" (its own window, banded, over [globals; tokens]);
    print(model) shows it with its window."""
    own = type(module).extra_repr(module)
    shown = f"attn_implementation={SLIDING_ATTENTION_NAME!r}, sliding_window={module.config.sliding_window}"
    module.extra_repr = _LSGExtraRepr(", ".join(filter(None, [own, shown])))
    if not is_selected(module):
        module.config = SelectedConfig(module.config, None, SLIDING_ATTENTION_NAME)


def deselect(module: nn.Module) -> None:
    """Give `module` back the model's config, and with it its previous implementation."""
    if is_selected(module):
        module.config = module.config.__dict__[_ORIGINAL]
        module.__dict__.pop("extra_repr", None)


def is_selected(module: nn.Module) -> bool:
    return isinstance(getattr(module, "config", None), SelectedConfig)


def selected_modules(root: nn.Module) -> list[nn.Module]:
    """Every module below `root` that runs "lsg" or "lsg_sliding"."""
    return [module for module in root.modules() if is_selected(module)]
