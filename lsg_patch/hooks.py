"""The forward hooks lsg_patch installs, and the handles that remove them.

Forward-time LSG work (prepending global tokens, block padding, building the mask once, trimming the
output) runs in PyTorch forward hooks on the host model's own modules instead of replacing their
forward functions: hooks survive deepcopy and pickling and need no copy of upstream code. Every hook is
registered while a conversion records (`recording_hooks`), and its `RemovableHandle` is kept with the
conversion's record: removal uses the handles, never the modules' private hook dictionaries. The handles are
pickled and deep-copied together with the modules they point into, so a copied model removes its own hooks.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

_RECORDING: contextvars.ContextVar[list[RemovableHandle] | None] = contextvars.ContextVar("lsg_hooks", default=None)


class LSGHook:
    """Base class of every hook lsg_patch registers (registered only inside `recording_hooks`)."""

    def register_pre(self, module: nn.Module) -> None:
        _record(module.register_forward_pre_hook(self, with_kwargs=True))

    def register_post(self, module: nn.Module) -> None:
        _record(module.register_forward_hook(self, with_kwargs=True))


@contextlib.contextmanager
def recording_hooks() -> Iterator[list[RemovableHandle]]:
    """Collect the handles of the LSGHooks registered inside the block (a conversion installing its family's
    hooks), in registration order."""
    handles: list[RemovableHandle] = []
    token = _RECORDING.set(handles)
    try:
        yield handles
    finally:
        _RECORDING.reset(token)


def remove_hooks(handles: list[RemovableHandle]) -> None:
    """Remove the hooks of a conversion (removing one twice is harmless)."""
    for handle in handles:
        handle.remove()


def _record(handle: RemovableHandle) -> None:
    handles = _RECORDING.get()
    if handles is None:
        handle.remove()
        raise RuntimeError("LSG hooks are registered by a conversion only (inside hooks.recording_hooks())")
    handles.append(handle)
