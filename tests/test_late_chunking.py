"""lsg_patch.encode_chunks (late chunking) against an oracle written from its definition: one forward of the
encoder per window, each token's state taken by hand from the window where it lies most centred, the chunk's
states pooled by hand; and against sentence-transformers' own `encode` for a document that is one chunk."""
from __future__ import annotations

import functools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsg_patch
from lsg_patch.demo import minilm_path
from tests.tiny_models import tiny_model

sentence_transformers = pytest.importorskip("sentence_transformers")
SentenceTransformer = sentence_transformers.SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

WORDS = ("the module reads a long document before each chunk is pooled ; late chunking keeps what came earlier "
         "in the text , and class names bind to methods far away . why ? because attention sees everything !").split()
POSITIONS = 128  # the tiny models' position table: documents past ~126 tokens are cut into windows
SETTINGS = dict(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


@functools.cache
def tiny_folder() -> str:
    """A random 2-layer BERT of the MiniLM vocabulary with its tokenizer, saved once (sentence-transformers'
    Transformer module loads from a folder; nothing is downloaded)."""
    import tempfile

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = tiny_model("bert", vocab_size=tokenizer.vocab_size, max_position_embeddings=POSITIONS)
    folder = tempfile.mkdtemp(prefix="tiny_st_")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_st(pooling: str | tuple[str, ...] = "mean", normalize: bool = True) -> SentenceTransformer:
    transformer = Transformer(tiny_folder(), max_seq_length=POSITIONS)
    modules = [transformer, Pooling(32, pooling_mode=pooling)] + ([Normalize()] if normalize else [])
    return SentenceTransformer(modules=modules, device="cpu").eval()


@functools.cache
def converted_tiny() -> SentenceTransformer:
    return lsg_patch.to_lsg(tiny_st(), max_length=1024, block_size=16, sparse_block_size=16)


def encode(model, texts, **options) -> list[lsg_patch.ChunkedDocument]:
    return lsg_patch.encode_chunks(model, texts, show_progress_bar=False, **options)


# --- the oracle ------------------------------------------------------------------------------------------------

def oracle_states(model: SentenceTransformer, text: str, max_length: int, overlap: int) -> torch.Tensor:
    """Token states of [CLS] text [SEP] by the definition: windows of max_length - 2 text tokens every
    max_length - 2 - overlap tokens, the last one ending at the end; each text token from the window where it
    is farthest from the window's edges (the first such window); [CLS] from the first window, [SEP] from the last."""
    tokenizer, encoder = model.tokenizer, model[0].auto_model
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    size = max_length - 2
    starts = [0]
    while starts[-1] + size < len(ids):
        starts.append(min(starts[-1] + size - overlap, len(ids) - size))
    windows = []
    for start in starts:
        window = [tokenizer.cls_token_id] + ids[start: start + size] + [tokenizer.sep_token_id]
        with torch.no_grad():
            windows.append(encoder(input_ids=torch.tensor([window])).last_hidden_state[0])
    rows = [windows[0][0]]
    for token in range(len(ids)):
        margins = [min(token - s, s + size - 1 - token) if s <= token < s + size else -1 for s in starts]
        w = margins.index(max(margins))
        rows.append(windows[w][1 + token - starts[w]])
    rows.append(windows[-1][-1])
    return torch.stack(rows)


def oracle_mean(states: torch.Tensor, rows: range) -> torch.Tensor:
    total = sum(states[i] for i in rows)
    vector = total / len(rows)
    return vector / vector.norm()


def oracle_token_chunks(states: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean-pooled normalised chunks of chunk_size text tokens; [CLS] with the first, [SEP] with the last."""
    count = states.shape[0] - 2
    chunks = []
    for start in range(0, count, chunk_size):
        first = 0 if start == 0 else 1 + start
        last = count + 2 if start + chunk_size >= count else 1 + start + chunk_size
        chunks.append(oracle_mean(states, range(first, last)))
    return torch.stack(chunks)


# --- against the oracle ----------------------------------------------------------------------------------------

@settings(**SETTINGS)
@given(count=st.integers(20, 200), chunk_size=st.integers(1, 90), seed=st.integers(0, 10**6))
def test_token_chunks_of_a_converted_model_are_its_token_states_pooled(count, chunk_size, seed):
    text = words(count, seed)
    model = converted_tiny()
    result = encode(model, [text], chunk_size=chunk_size)[0]
    expected = oracle_token_chunks(oracle_states(model, text, 1024, 0), chunk_size)
    torch.testing.assert_close(result.embeddings, expected, atol=1e-6, rtol=0)


@settings(**SETTINGS)
@given(count=st.integers(100, 300), chunk_size=st.integers(4, 60), overlap=st.integers(0, 100),
       seed=st.integers(0, 10**6))
def test_windows_with_overlap_take_each_token_from_its_most_centred_window(count, chunk_size, overlap, seed):
    text = words(count, seed)
    model = tiny_st()
    result = encode(model, [text], chunk_size=chunk_size, window_overlap=overlap)[0]
    expected = oracle_token_chunks(oracle_states(model, text, POSITIONS, overlap), chunk_size)
    torch.testing.assert_close(result.embeddings, expected, atol=1e-6, rtol=0)


def test_character_spans_pool_the_tokens_they_overlap():
    text = words(200, 1)
    model = converted_tiny()
    offsets = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = [(0, len(text)), (5, 40), (offsets[10][0] + 1, offsets[30][1]), (offsets[-3][0], len(text))]
    result = encode(model, [text], chunk_by="spans", spans=[spans])[0]
    states = oracle_states(model, text, 1024, 0)
    expected = []
    for start, end in spans:
        tokens = [i for i, (a, b) in enumerate(offsets) if a < end and start < b]
        first = 0 if tokens[0] == 0 else 1 + tokens[0]
        last = len(offsets) + 2 if tokens[-1] == len(offsets) - 1 else 2 + tokens[-1]
        expected.append(oracle_mean(states, range(first, last)))
    assert result.spans == spans
    torch.testing.assert_close(result.embeddings, torch.stack(expected), atol=1e-6, rtol=0)


# --- against sentence-transformers' encode ---------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens",
                                     ("cls", "mean")])
@pytest.mark.parametrize("normalize", [True, False])
def test_a_one_chunk_document_gets_the_embedding_encode_gives_it(pooling, normalize):
    model = tiny_st(pooling, normalize)
    texts = [words(90, 2), words(7, 3)]
    result = encode(model, texts, chunk_size=1000)
    expected = model.encode(texts, convert_to_tensor=True)
    for document, vector, text in zip(result, expected, texts):
        assert document.spans == [(0, len(text))]
        torch.testing.assert_close(document.embeddings[0], vector, atol=1e-6, rtol=0)


def test_a_one_chunk_document_of_a_converted_model_matches_encode():
    text = words(600, 4)
    model = converted_tiny()
    vector = encode(model, [text], chunk_size=10_000)[0].embeddings[0]
    torch.testing.assert_close(vector, model.encode([text], convert_to_tensor=True)[0], atol=1e-6, rtol=0)


# --- batching, padding, spans ----------------------------------------------------------------------------------

@pytest.mark.parametrize("converted", [False, True])
def test_a_document_alone_or_padded_in_a_batch_gets_the_same_chunks(converted):
    model = converted_tiny() if converted else tiny_st()
    texts = [words(150, 5), words(20, 6), words(400, 7), words(3, 8)]
    together = encode(model, texts, chunk_size=32, batch_size=3)
    for text, batched in zip(texts, together):
        alone = encode(model, [text], chunk_size=32, batch_size=1)[0]
        assert alone.spans == batched.spans
        torch.testing.assert_close(batched.embeddings, alone.embeddings, atol=1e-6, rtol=0)


@settings(**SETTINGS)
@given(text=st.lists(st.sampled_from(list("ab .,\n!?'é") + ["word", "Chunk", "  "]), min_size=1,
                    max_size=60).map("".join),
       chunk_size=st.integers(1, 12), chunk_by=st.sampled_from(["tokens", "sentences"]))
def test_chunk_spans_tile_the_text_and_hold_at_most_chunk_size_tokens(text, chunk_size, chunk_by):
    model = tiny_st()
    result = encode(model, [text], chunk_size=chunk_size, chunk_by=chunk_by)[0]
    offsets = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if not offsets:
        assert result.spans == [] and result.embeddings.shape == (0, 32)
        return
    assert result.spans[0][0] == 0 and result.spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(result.spans, result.spans[1:]))
    assert result.embeddings.shape == (len(result.spans), 32)
    per_chunk = [sum(start <= a < end for a, _ in offsets) for start, end in result.spans]
    assert sum(per_chunk) == len(offsets) and all(1 <= n <= chunk_size for n in per_chunk)


def test_sentence_chunks_end_at_sentence_ends_when_sentences_fit():
    sentences = ["The first sentence is here.", "A second one follows it!", "Does a third fit?",
                 "Then a fourth one ends the text."]
    text = " ".join(sentences)
    result = encode(tiny_st(), [text], chunk_by="sentences", chunk_size=16)[0]
    pieces = [text[start:end].strip() for start, end in result.spans]
    assert len(pieces) >= 2 and " ".join(pieces) == text
    assert all(piece.endswith((".", "!", "?")) for piece in pieces)


# --- refusals --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(chunk_size=0), "chunk_size=0 must be a positive number"),
    (dict(window_overlap=-1), r"window_overlap=-1 must be a number of tokens >= 0 \(or None\)"),
    (dict(window_overlap=126), "window_overlap=126 must be below the 126 document tokens"),
    (dict(chunk_by="words"), r"chunk_by='words': use one of \('tokens', 'sentences', 'spans'\)"),
    (dict(chunk_by="spans"), "give spans= exactly when chunk_by='spans'"),
    (dict(spans=[[(0, 3)]]), "set chunk_by='spans'"),
    (dict(chunk_by="spans", spans=[[(0, 999)]]), r"span \(0, 999\) of text 0 must be"),
    (dict(chunk_by="spans", spans=[[(4, 5)]]), r"span \(4, 5\) of text 0 holds no token"),
    (dict(chunk_by="spans", spans=[]), "spans has 0 lists for 1 texts"),
    (dict(max_length=4096), "max_length=4096 must be an int from 3 to the model's 128 positions"),
    (dict(pooling="mean"), "a SentenceTransformer pools, normalises and tokenizes as its modules say"),
])
def test_refusals_name_the_value_and_what_is_accepted(options, message):
    with pytest.raises(ValueError, match=message):
        encode(tiny_st(), ["some text    and more"], **options)


def test_refuses_a_pooling_it_does_not_know_and_models_it_cannot_use():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    bert = tiny_model("bert", vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"pooling 'median' is not one encode_chunks knows: use one of \('cls'"):
        encode(bert, ["text"], tokenizer=tokenizer, pooling="median")
    with pytest.raises(ValueError, match="needs tokenizer= and pooling="):
        encode(bert, ["text"], tokenizer=tokenizer)
    llama = tiny_model("llama", vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match="needs a bidirectional encoder; 'llama'"):
        encode(llama, ["text"], tokenizer=tokenizer, pooling="lasttoken")
    with pytest.raises(ValueError, match="texts must be a list of strings, got str: wrap one text as"):
        encode(bert, "text", tokenizer=tokenizer, pooling="mean")
    dense = SentenceTransformer(modules=[*tiny_st(), sentence_transformers.base.modules.Dense(32, 8)], device="cpu")
    with pytest.raises(ValueError, match=r"this one has \['Transformer', 'Pooling', 'Normalize', 'Dense'\]"):
        encode(dense, ["text"])


def test_a_transformers_encoder_with_a_pooling_choice_matches_the_sentence_transformer():
    model = tiny_st("cls", normalize=False)
    text = words(300, 9)
    from_st = encode(model, [text], chunk_size=40, window_overlap=30)[0]
    from_transformers = encode(model[0].auto_model, [text], chunk_size=40, window_overlap=30,
                               tokenizer=model.tokenizer, pooling="cls", max_length=POSITIONS)[0]
    assert from_transformers.spans == from_st.spans
    torch.testing.assert_close(from_transformers.embeddings, from_st.embeddings, atol=0, rtol=0)


# --- the real all-MiniLM-L6-v2 ---------------------------------------------------------------------------------

def test_minilm_late_chunks_match_encode_and_the_oracle():
    """The real all-MiniLM-L6-v2 (converted models are checked on the tiny one: a converted MiniLM forward is
    slow on a loaded CPU): one chunk equals encode, windows of 128 tokens overlapping by 32 equal the oracle."""
    model = SentenceTransformer(minilm_path(), device="cpu")
    short = words(60, 10)
    torch.testing.assert_close(encode(model, [short], chunk_size=512)[0].embeddings[0],
                               model.encode([short], convert_to_tensor=True)[0], atol=1e-6, rtol=0)
    text = words(260, 11)
    result = encode(model, [text], chunk_size=50, max_length=128, window_overlap=32)[0]
    expected = oracle_token_chunks(oracle_states(model, text, 128, 32), 50)
    torch.testing.assert_close(result.embeddings, expected, atol=1e-6, rtol=0)
