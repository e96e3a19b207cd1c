"""The forward hooks lsg_patch installs, and their removal.

Forward-time LSG work (prepending global tokens, block padding, building the mask once, trimming the
output) runs in PyTorch forward hooks on the host model's own modules instead of replacing their
forward functions: hooks survive deepcopy and pickling, need no copy of upstream code, and are all
found again for removal because every one of them is an `LSGHook`.
"""
from __future__ import annotations

from torch import nn


class LSGHook:
    """Base class of every hook lsg_patch registers; `remove_lsg_hooks` finds them by this type."""

    def register_pre(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self, with_kwargs=True)

    def register_post(self, module: nn.Module) -> None:
        module.register_forward_hook(self, with_kwargs=True)


def remove_lsg_hooks(root: nn.Module) -> None:
    """Remove every LSGHook from `root` and its submodules."""
    for module in root.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [key for key, hook in hooks.items() if isinstance(hook, LSGHook)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


def has_lsg_hooks(root: nn.Module) -> bool:
    """True if any LSGHook is registered on `root` or below."""
    return any(
        isinstance(hook, LSGHook)
        for module in root.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for hook in hooks.values()
    )
