"""A real pretrained model: all-MiniLM-L6-v2 (BERT, 512 positions) converted to 4096 tokens."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import lsg_patch
from lsg_patch.demo import PARAGRAPH, mean_pool
from tests.helpers import minilm_folder as minilm_path

SENTENCES = [
    "A cat sits on the mat.",
    "Long documents need efficient attention mechanisms to be processed by transformers.",
    "The quarterly report shows revenue growth in every region except the north, " * 6,
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def original():
    return AutoModel.from_pretrained(minilm_path()).eval()


def converted(original, tokenizer, **options):
    return lsg_patch.to_lsg(copy.deepcopy(original), max_length=4096, tokenizer=tokenizer, **options)


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def test_long_document_in_a_padded_batch_gives_what_each_document_gives_alone(original, tokenizer):
    """The real checkpoint on 3000+ tokens next to a 700-token document, padded in one batch: the shorter row's
    outputs are those of that document alone (block padding, masks and sparse keys agree at this scale; the
    sparse path itself is checked against the oracle in test_model_oracle.py)."""
    model = converted(original, tokenizer)
    batch = tokenizer([PARAGRAPH * 60, PARAGRAPH * 12], return_tensors="pt", padding=True, truncation=True,
                      max_length=4096)
    length = int(batch["attention_mask"][1].sum())
    assert batch["input_ids"].shape[1] > 3000 and 600 < length < 1000
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        alone = model(**{k: v[1:, :length] for k, v in batch.items()}).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384)
    torch.testing.assert_close(hidden[1, :length], alone[0], rtol=0, atol=1e-4)


def test_short_inputs_keep_their_sentence_embeddings(original, tokenizer):
    """On inputs of at most 2*block_size tokens LSG is full attention plus one global token, so the
    mean-pooled embedding moves only a little. Measured cosine: see the README (>= 0.97 for each sentence);
    0.95 leaves room for float noise while still failing on any real mistake (random directions give ~0)."""
    model = converted(original, tokenizer)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    cosine = torch.nn.functional.cosine_similarity(embed(model, batch), embed(original, batch), dim=-1)
    print("MiniLM short-input cosine per sentence:", [round(c, 4) for c in cosine.tolist()])
    assert (cosine > 0.95).all(), cosine


def test_mask_first_token_reproduces_the_original_exactly(original, tokenizer):
    """With mask_first_token the first global token (initialised as [CLS] at position 0) replaces the
    masked [CLS] key, so on short inputs every hidden state equals the original model's.

    Each sentence alone: every row. In a padded batch: every real token's row; the rows of padding
    positions are float noise even for the original model (its own eager and sdpa outputs differ by
    6e-5 there), so they are not compared."""
    model = converted(original, tokenizer, mask_first_token=True)
    for sentence in SENTENCES:
        batch = tokenizer(sentence, return_tensors="pt")
        with torch.no_grad():
            difference = model(**batch).last_hidden_state - original(**batch).last_hidden_state
        assert difference.abs().max().item() <= 1e-5, sentence
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        difference = model(**batch).last_hidden_state - original(**batch).last_hidden_state
    assert difference[batch["attention_mask"].bool()].abs().max().item() <= 1e-5


def test_plain_to_lsg_finds_the_saved_tokenizer_and_logs_it(original, tokenizer, caplog):
    caplog.set_level("INFO", logger="lsg_patch")
    plain = lsg_patch.to_lsg(copy.deepcopy(original), max_length=1024)
    assert "token ids from the tokenizer saved with the model" in caplog.text
    explicit = converted(original, tokenizer)
    assert torch.equal(plain.embeddings.global_embeddings.weight, explicit.embeddings.global_embeddings.weight)
    words = original.embeddings.word_embeddings.weight
    positions = original.embeddings.position_embeddings.weight
    token_type = original.embeddings.token_type_embeddings.weight[0]
    expected_row_1 = positions[64] + words[tokenizer.mask_token_id] + token_type  # stride 64: row 1 is position 64
    assert torch.allclose(plain.embeddings.global_embeddings.weight[1], expected_row_1, atol=1e-6)
