"""Parity with the reference LSG implementation on every golden case (atol 1e-5, float32)."""
from __future__ import annotations

import pytest
import torch

import lsg_patch
from tests.golden_cases import case_names, load_case, lsg_model_for, plain_model

ATOL = 1e-5
ENCODER_ONLY_CASES = [n for n in case_names() if not n.startswith(("bart", "convert_"))]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("name", ENCODER_ONLY_CASES)
def test_encoder_case_reproduces_reference_outputs(name: str) -> None:
    case = load_case(name)
    model = lsg_model_for(case)
    with torch.no_grad():
        out = model(input_ids=case.tensors["inputs.input_ids"], attention_mask=case.tensors["inputs.attention_mask"])
    assert_close(out.last_hidden_state, case.tensors["outputs.last_hidden_state"], f"{name} last_hidden_state")
    if "outputs.pooler_output" in case.tensors:
        assert_close(out.pooler_output, case.tensors["outputs.pooler_output"], f"{name} pooler_output")


def test_state_dict_keys_match_reference_checkpoint() -> None:
    for name in ENCODER_ONLY_CASES:
        case = load_case(name)
        model = lsg_model_for(case)
        assert set(model.state_dict()) == set(case.weights), name


def test_conversion_reproduces_reference_converter() -> None:
    """convert_bert: plain 512-position BERT -> 1024 positions, global tokens initialised from positions."""
    case = load_case("convert_bert")
    conversion = case.meta["conversion"]
    from safetensors.torch import load_file
    from tests.golden_cases import GOLDEN

    model = plain_model(case, conversion["source_config"])
    model.load_state_dict(load_file(str(GOLDEN / case.meta["files"]["source"])), strict=True)
    lsg_patch.to_lsg(
        model,
        max_length=conversion["max_sequence_length"],
        bos_token_id=conversion["bos_id"],
        mask_token_id=conversion["mask_id"],
        global_positional_stride=conversion["global_positional_stride"],
        **case.lsg_params,
    )
    converted = model.state_dict()
    assert set(converted) == set(case.weights)
    for key, expected in case.weights.items():
        assert_close(converted[key], expected, f"convert_bert {key}")
    with torch.no_grad():
        out = model(input_ids=case.tensors["inputs.input_ids"], attention_mask=case.tensors["inputs.attention_mask"])
    assert_close(out.last_hidden_state, case.tensors["outputs.last_hidden_state"], "convert_bert last_hidden_state")
    assert_close(out.pooler_output, case.tensors["outputs.pooler_output"], "convert_bert pooler_output")
