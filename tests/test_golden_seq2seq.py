"""Parity with the reference LSG implementation on the encoder-decoder golden case (atol 1e-5, float32).

bart_norm: BART, norm sparsity, block 8, a padded batch of 75 tokens (adaptive padding to 80), global
tokens passed to the decoder (encoder output keeps its global row; cross-attention sees it).
"""
from __future__ import annotations

import torch

from tests.golden_cases import load_case, lsg_seq2seq_model_for

ATOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g} > {ATOL}"


def test_bart_norm_reproduces_reference_outputs() -> None:
    case = load_case("bart_norm")
    model = lsg_seq2seq_model_for(case)  # loads the reference state_dict with strict=True
    inputs = {name: case.tensors[f"inputs.{name}"] for name in ("input_ids", "attention_mask", "decoder_input_ids")}
    mask_before = inputs["attention_mask"].clone()
    with torch.no_grad():
        out = model(**inputs)
    assert_close(out.encoder_last_hidden_state, case.tensors["outputs.encoder_last_hidden_state"], "encoder")
    assert_close(out.last_hidden_state, case.tensors["outputs.decoder_last_hidden_state"], "decoder")
    assert torch.equal(inputs["attention_mask"], mask_before), "the caller's attention_mask was modified"


def test_bart_state_dict_matches_reference_checkpoint() -> None:
    case = load_case("bart_norm")
    model = lsg_seq2seq_model_for(case)
    assert set(model.state_dict()) == set(case.weights)
    assert model.config.max_position_embeddings == case.meta["config"]["max_position_embeddings"]
