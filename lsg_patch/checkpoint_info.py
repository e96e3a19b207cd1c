"""What `lsg-patch info` reports about a checkpoint folder, read from config.json and the weight files' headers
(nothing is loaded or run): is it LSG, saved by whom, with what settings, how long, which position kind."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .persistence import REFERENCE_CODE_PREFIX, check_checkpoint_folder, check_config_folder, saved_settings, weight_names
from .swap import MAX_LENGTH_KEY


def checkpoint_report(folder: Path) -> dict[str, Any]:
    """What `info` prints: read from config.json and the weight files' headers (nothing is loaded or run)."""
    check_config_folder(folder)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {error.msg} (line {error.lineno})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str) or not raw["model_type"]:
        raise ValueError(f"{folder / 'config.json'} has no model_type: it is not a transformers model config")
    config = argparse.Namespace(**raw)
    settings = saved_settings(config)
    shapes = _weight_shapes(folder)
    report: dict[str, Any] = {
        "path": str(folder),
        "model_type": raw.get("model_type"),
        "architectures": list(raw.get("architectures") or []),
        "is_lsg": settings is not None,
        "max_length": raw.get(MAX_LENGTH_KEY) or _max_length(raw.get("model_type"), shapes),  # tableless kinds
        "has_weights": bool(shapes),
        "positions": _position_kind(raw.get("model_type")),
    }
    if settings is None:
        return report
    auto_map = raw.get("auto_map") or {}
    by_reference = any(str(v).split("--")[-1].startswith(REFERENCE_CODE_PREFIX) for v in auto_map.values())
    globals_ = [shape for name, shape in shapes.items() if name.endswith("global_embeddings.weight")]
    report.update(
        saved_by="the public LSG project" if by_reference else "lsg_patch" if "lsg_patch_note" in raw else "unknown",
        settings=settings.config_entries(bool(raw.get("is_encoder_decoder"))),
        global_table_rows=globals_[0][0] if globals_ else None,
    )
    return report


def _weight_shapes(folder: Path) -> dict[str, list[int]]:
    try:
        names = weight_names(check_checkpoint_folder(folder))
    except ValueError:
        return {}
    wanted = [n for n in names if n.endswith(("global_embeddings.weight", "position_embeddings.weight", "embed_positions.weight"))]
    return {name: _shape(folder, name) for name in wanted}


def _shape(folder: Path, name: str) -> list[int]:
    index = folder / "model.safetensors.index.json"
    file = folder / (json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors")
    if file.is_file():
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return list(handle.get_slice(name).get_shape())
    import torch

    bin_index = folder / "pytorch_model.bin.index.json"
    file = folder / (json.loads(bin_index.read_text())["weight_map"][name] if bin_index.is_file() else "pytorch_model.bin")
    return list(torch.load(file, map_location="meta", weights_only=True)[name].shape)


def _position_kind(model_type: Any) -> str | None:
    """The registry entry's position kind: "learned" (tiled when extended), "sinusoidal" (regenerated), "rotary",
    "relative_bias" (T5) or "none" (no table)."""
    from .registry import supported_architectures

    entry = supported_architectures().get(model_type)
    return None if entry is None else entry.position_kind


def _max_length(model_type: Any, shapes: dict[str, list[int]]) -> int | None:
    from .registry import supported_architectures

    entry = supported_architectures().get(model_type)
    if entry is None or not entry.has_position_table:
        return None
    for name, shape in shapes.items():
        if name.endswith(entry.position_embeddings + ".weight"):
            return shape[0] - entry.position_offset
    return None
