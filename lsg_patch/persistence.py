"""Rebuilding LSG models from checkpoints: those saved by lsg_patch and those saved by the public LSG project.

A saved LSG checkpoint already holds position tables at full length and a trained 512-row global table, so
rebuilding must neither tile positions nor initialise global tokens: `swap.attach_saved_lsg` swaps in the LSG
attention and hooks on a freshly built (usually still meta-device) plain model and adds an *empty* global
table for transformers' own loader to fill. `lsg_patch.enabled()` calls it between model construction and
weight loading; `lsg_patch.from_pretrained` (in context.py, beside `enabled()`) is the one-call version of that.
This module only reads: settings from configs, classes from names, weight names from files.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .config import LSGConfig, has_lsg_settings

logger = logging.getLogger("lsg_patch")

REFERENCE_CODE_PREFIX = "modeling_lsg_"  # auto_map entries of the public LSG project point at these files
LSG_CLASS_PREFIX = "LSG"  # reference class names: LSGBertForMaskedLM is BertForMaskedLM with LSG attention
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def saved_settings(model_config: Any) -> LSGConfig | None:
    """The LSG settings a checkpoint config carries (validated), or None for a plain checkpoint."""
    if not has_lsg_settings(model_config):
        return None
    try:
        return LSGConfig.from_model_config(model_config)
    except ValueError as error:
        name = getattr(model_config, "_name_or_path", "") or "this checkpoint"
        raise ValueError(f"the LSG settings in the config of {name} are invalid: {error}") from None


def drop_reference_code_map(model_config: Any) -> bool:
    """Remove an `auto_map` that points at the public LSG project's modeling files; True if one was removed.

    lsg_patch never runs that code and does not copy it, so a re-saved checkpoint must not point at it.
    """
    auto_map = getattr(model_config, "auto_map", None)
    if isinstance(auto_map, dict) and auto_map and all(
        str(ref).split("--")[-1].startswith(REFERENCE_CODE_PREFIX) for ref in auto_map.values()
    ):
        del model_config.auto_map
        return True
    return False


def model_class_for(model_config: Any, architecture: str | None = None) -> type:
    """The transformers class to load: `architecture` if given, else the config's first architecture; a
    reference name such as LSGBertForMaskedLM maps to BertForMaskedLM; with neither, the Auto base class."""
    import transformers

    name = architecture or next(iter(getattr(model_config, "architectures", None) or []), None)
    if name is None:
        return transformers.AutoModel
    plain = name[len(LSG_CLASS_PREFIX) :] if name.startswith(LSG_CLASS_PREFIX) else name
    heads = head_classes(model_config)
    if plain not in heads:
        listed = ", ".join(sorted(heads)) or "none"
        raise ValueError(
            f"architecture {name!r} is not a transformers class for model_type {model_config.model_type!r}; "
            f"accepted: {listed}"
        )
    return getattr(transformers, plain)


def head_classes(model_config: Any) -> set[str]:
    """Every transformers model class name registered for the config's model_type (all Auto mappings)."""
    from transformers.models.auto import modeling_auto

    names = set()
    for attribute in dir(modeling_auto):
        mapping = getattr(modeling_auto, attribute)
        if attribute.startswith("MODEL_") and attribute.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            value = mapping.get(model_config.model_type)
            if isinstance(value, str):
                names.add(value)
            elif isinstance(value, (tuple, list)):
                names.update(v for v in value if isinstance(v, str))
    import transformers

    return {name for name in names if hasattr(transformers, name)}


def check_config_folder(path: str | os.PathLike) -> Path:
    """A local folder with a config.json, or a ValueError saying what is wrong (missing, a file, no config)."""
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is a file, not a checkpoint folder: give the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} has no config.json: it is not a transformers checkpoint folder")
    return folder


def check_checkpoint_folder(path: str | os.PathLike) -> Path:
    """A local checkpoint folder with a config.json and weights, or a ValueError saying what is missing."""
    folder = check_config_folder(path)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{str(folder)!r} holds no model weights (looked for {', '.join(WEIGHT_FILES)})")
    return folder


def weight_names(folder: Path) -> list[str]:
    """The parameter names stored in a checkpoint folder, read from file headers and indexes only."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return sorted(json.loads((folder / index).read_text())["weight_map"])
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            return sorted(handle.keys())
    import torch

    return sorted(torch.load(folder / "pytorch_model.bin", map_location="meta", weights_only=True))


def __getattr__(name: str) -> Any:
    """Import alias: `from_pretrained` moved to lsg_patch.context, beside `enabled()` which it uses (imported on
    first use, so this module imports nothing that imports it)."""
    if name == "from_pretrained":
        from .context import from_pretrained

        return from_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
