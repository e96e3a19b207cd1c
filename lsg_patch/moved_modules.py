"""Old import paths of renamed modules, kept importable: a converted model or cache pickled (torch.save) before a
rename names its classes by the module they lived in, and user code may import the old paths."""
from __future__ import annotations

import importlib
import sys

MOVED_MODULES = {  # old path -> the module that now holds its code
    "lsg_patch.inference": "lsg_patch.architecture_inference",
    "lsg_patch.attention.cached": "lsg_patch.attention.decoding_state",
    "lsg_patch.seam.cache": "lsg_patch.seam.lsg_cache",
    "lsg_patch.families.caching": "lsg_patch.families.cache_routing",
}


def alias_moved_modules() -> None:
    """Make each old path import (and be an attribute of its package) as the module that replaced it."""
    for old, new in MOVED_MODULES.items():
        module = importlib.import_module(new)
        sys.modules.setdefault(old, module)
        package, _, name = old.rpartition(".")
        setattr(importlib.import_module(package), name, module)
