"""The decoder long-range benchmark (benchmarks/quality/decoder_long_range.py): the sliding-window scoring
against per-token forwards written from its definition, the passkey and key/assert insertion, identifier
classes on hand-made offsets, and the whole pipeline in --quick mode."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.quality import code_corpus as C
from benchmarks.quality import decoder_long_range as D

CODE = "\n".join(f"def function_{i}(value):\n    return value + {i}\n" for i in range(120))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return C.train_tokenizer([CODE, "x = 12345\nassert x == 67890\n"], vocab_size=300)


@pytest.mark.parametrize("length, window, stride", [(40, 16, 4), (37, 16, 5), (16, 16, 4), (10, 16, 4), (50, 16, 15)])
def test_window_scores_equal_one_forward_per_token_over_its_window(length, window, stride):
    model = tiny_llama()
    ids = torch.randint(0, 50, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    nll, correct = D.window_scores(model, ids, window, stride, batch=3)
    ends = D.window_ends(length, window, stride)
    assert ends[0] == min(window, length) and ends[-1] == length
    assert all(0 < b - a <= stride for a, b in zip(ends, ends[1:]))
    for t in range(1, length):  # token t is scored by the first window that ends after it
        end = next(e for e in ends if e > t)
        start = max(0, end - window)
        assert t - start >= min(t, window - stride)  # context the token had in that window
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[start:t]])).logits[0, -1]
        expected = F.cross_entropy(logits[None], torch.tensor([ids[t]])).item()
        assert nll[t - 1] == pytest.approx(expected, abs=1e-5)
        assert correct[t - 1] == (logits.argmax().item() == ids[t])


@pytest.mark.parametrize("stride", [0, 16, 20])
def test_window_stride_must_leave_context(stride):
    with pytest.raises(ValueError, match=f"stride must be in \\[1, window - 1\\] = \\[1, 15\\].*got {stride}"):
        D.window_ends(40, 16, stride)


def test_whole_scores_are_next_token_losses_of_one_forward():
    model = tiny_llama()
    ids = list(range(1, 30))
    nll, _ = D.whole_scores(model, ids)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert nll.shape == (28,) and nll.mean() == pytest.approx(loss, abs=1e-5)


def test_passkey_puts_the_key_near_the_top_and_the_assert_at_least_d_tokens_later(tokenizer):
    file = C.CodeFile("hand/made.py", CODE)
    for distance in (30, 200, 600):
        key = C.passkey(tokenizer, file, distance, "48213")
        text = tokenizer.decode(key.ids[1:])
        assert text.splitlines()[-1].endswith("assert _KEY_A == 48213") and text.count("_KEY_A = 48213\n") == 1
        assert [tokenizer.decode([key.ids[d]]) for d in key.digits] == list("48213")
        assert key.digits[-1] == len(key.ids) - 1 and key.target == distance
        assert distance <= key.distance < distance + 30  # the next line start after d tokens
        key_digit = key.digits[0] - key.distance
        assert tokenizer.decode(key.ids[key_digit: key_digit + 5]) == "48213" and 16 <= key_digit < 40
    assert C.passkey(tokenizer, file, 10**6, "48213") is None


def test_training_pairs_assert_the_value_of_their_own_key(tokenizer):
    text = C.with_key_pairs(tokenizer, CODE, random.Random(3), tokens_per_pair=100, max_distance=400)
    keys = re.findall(r"^\s*(_KEY_[A-Z]) = (\d{5})$", text, flags=re.M)
    asserts = re.findall(r"^\s*assert (_KEY_[A-Z]) == (\d{5})$", text, flags=re.M)
    assert len(keys) >= 5 and sorted(keys) == sorted(asserts) and len({k for k, _ in keys}) == len(keys)
    for name, _ in keys:
        assert text.index(f"{name} = ") < text.index(f"assert {name} == ")
    assert [line for line in text.splitlines() if "_KEY_" not in line] == CODE.splitlines()


def test_identifier_classes_by_the_last_occurrence_of_the_name():
    # one token per word, BOS first: "a" at token 1, "b" at 2, "a" at 3 (near), ten fillers, "a" at 14 (far
    # for gap 5), "b" at 15 (far), "c" at 16 (new)
    words = ["a", "b", "a"] + [f"f{i}" for i in range(10)] + ["a", "b", "c"]
    text = " ".join(words)
    offsets = [(0, 0)] + [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    spans = [(s, e, text[s:e]) for s, e in offsets[1:]]
    classes = C.identifier_classes(spans, offsets, gap=5)
    kinds = {(text[spans[i][0]:spans[i][1]], tokens[0]): kind for i, (kind, tokens) in enumerate(classes)}
    assert kinds[("a", 1)] == "new" and kinds[("b", 2)] == "new" and kinds[("a", 3)] == "near"
    assert kinds[("a", 14)] == "far" and kinds[("b", 15)] == "far" and kinds[("c", 16)] == "new"
    assert len(C.identifier_classes(spans, offsets[:5], gap=5)) == 4  # identifiers past the tokens given are left out


def test_identifier_spans_are_pythons_names():
    spans = C.identifier_spans("def f(x):\n    return x + len('y')\n")
    assert [name for _, _, name in spans] == ["f", "x", "x", "len"]
    assert all("def f(x):\n    return x + len('y')\n"[s:e] == n for s, e, n in spans)


def test_quick_benchmark_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = D.main(["--quick", "--out", str(tmp_path), "--checkpoints", str(tmp_path / "models")])
    means = result["summary"]["means"]
    assert set(means) == {"window-512", "full-4k", "lsg-4k", "lsg-4k default", "window-512 +train", "lsg-4k +train"}
    for name, m in means.items():
        assert all(np.isfinite(v) for v in m["loss_by_position"].values()), name
        assert m["passkey_n"] == means["window-512"]["passkey_n"] and sum(m["passkey_n"].values()) >= 2
    # after its LSG training steps the converted model differs from the zero-shot one
    assert means["lsg-4k +train"]["loss_by_position"] != means["lsg-4k"]["loss_by_position"]
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["summary"]["differences"] and written["settings"]["long_length"] == D.QUICK.long_length
    assert (tmp_path / "quality_by_distance.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    assert "Paired differences" in table and table.count("| lsg-4k +train - window-512 +train |") == (
        len(D.QUICK.buckets) + 3 + 2 * len(D.QUICK.distances))  # buckets, identifier classes, passkey metrics
    assert (tmp_path / "models" / "lsg_trained" / "config.json").is_file()
    (tmp_path / "results.md").unlink()
    D.main(["--replot", "--out", str(tmp_path)])  # the same table again from the JSON alone
    assert (tmp_path / "results.md").read_text() == table
