"""sentence-transformers support: the transformers model inside a `SentenceTransformer`, and its folders.

A SentenceTransformer is a sequence of modules; the `Transformer` module holds the transformers model
(`auto_model`) and the tokenizer whose `model_max_length` is the model's `max_seq_length`. Converting the
model alone would leave `max_seq_length` at 256/512 and every longer text silently truncated, so `to_lsg`
converts the inner model *and* raises that length. Its saved folder is a transformers checkpoint plus
`modules.json` and the other modules' folders (pooling, normalize, ...); `lsg-patch convert` keeps those.
No import of sentence_transformers happens here: objects and folders are recognised by their shape.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

MODULES_FILE = "modules.json"
ROOT_FILES = ("modules.json", "config_sentence_transformers.json", "README.md")
MODULE_CONFIG = "sentence_bert_config.json"


def transformer_modules(model: Any) -> list[nn.Module] | None:
    """The sentence-transformers `Transformer` modules of `model` (those holding an `auto_model`), or None
    when `model` is not a sentence-transformers model (a transformers model is never one)."""
    if not isinstance(model, nn.Sequential) or not type(model).__module__.startswith("sentence_transformers"):
        return None
    return [module for module in model if isinstance(getattr(module, "auto_model", None), nn.Module)]


def set_max_seq_length(module: nn.Module, max_length: int) -> None:
    """Raise the module's `max_seq_length` (its tokenizer's `model_max_length` in sentence-transformers 5+,
    a plain attribute before)."""
    module.max_seq_length = max_length
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is not None:
        set_tokenizer_length(tokenizer, max_length)


def set_tokenizer_length(tokenizer: Any, max_length: int) -> None:
    """Make `truncation=True` cut at the converted length, now and after `save_pretrained`."""
    tokenizer.model_max_length = max_length
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    if isinstance(init_kwargs, dict):
        init_kwargs["model_max_length"] = max_length


def transformer_folder(folder: Path) -> Path | None:
    """For a sentence-transformers folder, the folder of its Transformer module (often the folder itself);
    None when `folder` has no modules.json. A modules.json without a Transformer module raises."""
    modules = _read_modules(folder)
    if modules is None:
        return None
    for module in modules:
        if str(module.get("type", "")).rpartition(".")[2] == "Transformer":
            return folder / str(module.get("path", ""))
    raise ValueError(f"{folder / MODULES_FILE} lists no Transformer module: lsg_patch has no model to convert there")


def copy_sentence_modules(source: Path, target: Path, max_length: int) -> list[str]:
    """Copy what makes `source` a sentence-transformers folder into `target`, where the converted transformers
    model is (or will be) saved: modules.json, its configs and every non-Transformer module's folder.
    The Transformer module's config gets `max_seq_length = max_length`. Returns the copied names."""
    modules = _read_modules(source) or []
    copied = []
    for name in ROOT_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    for module in modules:
        path = str(module.get("path", ""))
        kind = str(module.get("type", "")).rpartition(".")[2]
        if kind == "Transformer":
            (target / path).mkdir(parents=True, exist_ok=True)
            config_file = source / path / MODULE_CONFIG
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            config["max_seq_length"] = max_length
            (target / path / MODULE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            copied.append(str(Path(path) / MODULE_CONFIG))
        elif path and (source / path).is_dir():
            shutil.copytree(source / path, target / path)
            copied.append(path)
    return copied


def _read_modules(folder: Path) -> list[dict[str, Any]] | None:
    file = folder / MODULES_FILE
    if not file.is_file():
        return None
    try:
        modules = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error.msg} (line {error.lineno})") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{file} is not a sentence-transformers module list")
    return modules
