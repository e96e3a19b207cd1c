"""Resolving the module paths registry entries use ("encoder.layer.*.attention.self")."""
from __future__ import annotations

from torch import nn


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """`root.get_submodule(path)`, with "" meaning root itself."""
    return root if path == "" else root.get_submodule(path)


def find_modules(root: nn.Module, pattern: str) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, child name, child) matching a dotted pattern where "*" matches any one name."""
    parts = pattern.split(".")
    found: list[tuple[nn.Module, str, nn.Module]] = []

    def walk(module: nn.Module, index: int) -> None:
        part = parts[index]
        names = list(module._modules) if part == "*" else [part]
        for name in names:
            child = module._modules.get(name)
            if child is None:
                continue
            if index == len(parts) - 1:
                found.append((module, name, child))
            else:
                walk(child, index + 1)

    walk(root, 0)
    return found
