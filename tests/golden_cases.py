"""Loading the golden cases (outputs of the reference LSG implementation, see tests/golden/README.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

import lsg_patch
from lsg_patch.config import option_names

GOLDEN = Path(__file__).parent / "golden"
# Keys of the recorded configs that describe the reference's own classes, not the model.
_REFERENCE_ONLY_KEYS = {"auto_map", "base_model_prefix", "architectures", "_name_or_path", "transformers_version",
                        "torch_dtype", "model_type", *option_names()}  # fmt: skip


@dataclass
class GoldenCase:
    name: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def model_type(self) -> str:
        return self.meta["model_type"]

    @property
    def lsg_params(self) -> dict[str, Any]:
        return dict(self.meta["lsg_params"])

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(("inputs.", "outputs."))}

    def plain_config(self, config: dict[str, Any] | None = None) -> Any:
        values = {k: v for k, v in (config or self.meta["config"]).items() if k not in _REFERENCE_ONLY_KEYS}
        return AutoConfig.for_model(self.model_type, **values)


def case_names() -> list[str]:
    return sorted(p.stem for p in GOLDEN.glob("*.json"))


def load_case(name: str) -> GoldenCase:
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    return GoldenCase(name, meta, load_file(str(GOLDEN / meta["files"]["main"])))


def plain_model(case: GoldenCase, config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The plain transformers base model of the case's type, random weights, eval mode."""
    torch.manual_seed(0)
    return AutoModel.from_config(case.plain_config(config), attn_implementation="eager").eval()


def lsg_model_for(case: GoldenCase) -> torch.nn.Module:
    """A plain model patched with the case's LSG parameters, with the case's weights loaded strictly."""
    model = plain_model(case)
    offset = lsg_patch.supported_architectures()[case.model_type].position_offset
    max_length = case.meta["config"]["max_position_embeddings"] - offset
    lsg_patch.to_lsg(model, max_length=max_length, **case.lsg_params)
    model.load_state_dict(case.weights, strict=True)
    return model


def lsg_seq2seq_model_for(case: GoldenCase) -> torch.nn.Module:
    """`lsg_model_for` for BART-likes, whose config counts positions without the table's 2 offset rows."""
    model = plain_model(case)
    lsg_patch.to_lsg(model, max_length=case.meta["config"]["max_position_embeddings"], **case.lsg_params)
    model.load_state_dict(case.weights, strict=True)
    return model
