"""generate() on patched tiny BART and Pegasus with a 4096-token input (the long-input case of these families)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import lsg_patch

TINY = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512,
            init_std=0.2)  # fmt: skip
LENGTH = 4096


@pytest.mark.parametrize("model_type", ["bart", "pegasus"])
def test_generate_on_long_input_encodes_once_and_each_row_generates_what_it_generates_alone(model_type: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **TINY)).eval()
    lsg_patch.to_lsg(model, max_length=LENGTH, block_size=64, sparse_block_size=64, sparsity_factor=4)
    ids = torch.randint(5, 99, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 3000:] = 0
    encoder_calls = []
    model.get_encoder().register_forward_hook(lambda module, args, output: encoder_calls.append(output[0].shape))
    settings = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
    with torch.no_grad():
        first = model.generate(ids, **settings)
        assert encoder_calls == [torch.Size([2, 1 + LENGTH, 32])]  # once, global row kept for the decoder
        alone = model.generate(ids[1:, :3000], **{**settings, "attention_mask": mask[1:, :3000]})
        uncached = model.generate(ids, use_cache=False, **settings)
    assert len(encoder_calls) == 3
    assert first.shape == (2, 7)  # decoder start token + 6 new tokens
    assert torch.equal(first[1], alone[0]), "the padded row generates other tokens than the row alone"
    assert torch.equal(first, uncached)
