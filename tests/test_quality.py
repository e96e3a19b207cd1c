"""The long-document quality benchmark (benchmarks/quality/) and the fine-tuning example: the corpus builder on
hand-made sources, the metrics against hand-computed values, and both pipelines end to end in --quick mode
(random tiny model, a handful of this machine's documents)."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.quality import corpus as C
from benchmarks.quality import metrics as M
from benchmarks.quality.report import BINS, PAST_512, by_depth

ROOT = Path(__file__).resolve().parents[1]


def word_offsets(text: str) -> list[tuple[int, int]]:
    """A whitespace 'tokenizer': one token per word, so depths can be checked by hand."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def hand_made_sources(per_category: int = 30, words: int = 4000) -> list[C.Source]:
    """Sources whose every word names its source and index ('license7w123'), in both splits."""
    return [C.Source(f"{category}{i}", category, " ".join(f"{category}{i}w{k}" for k in range(words)))
            for category in C.CATEGORIES for i in range(per_category)]


def test_split_is_a_fixed_hash_rule():
    names = [f"doc{i}" for i in range(2000)]
    held_out = [n for n in names if C.split_of(n) == "held_out"]
    assert abs(len(held_out) / len(names) - C.HELD_OUT_PERCENT / 100) < 0.04
    # sha1("changelog.Debian.gz") % 100 == 24, sha1("README") % 100 == 41: pinned so the split never moves
    assert C.split_of("changelog.Debian.gz") == "held_out" and C.split_of("README") == "train"


def test_documents_join_two_unused_sources_of_one_split_with_passages_at_their_depth():
    sources = hand_made_sources()
    documents = C.build_documents(sources, "held_out", 12, word_offsets, min_tokens=1024, max_tokens=3584)
    assert len(documents) == 12
    used = [name for d in documents for name in d.name.split(" + ")]
    assert len(used) == len(set(used)) == 24
    assert all(C.split_of(name) == "held_out" for name in used)
    for index, document in enumerate(documents):
        words = document.text.split()
        assert len(words) == document.num_tokens and 1024 <= document.num_tokens <= 3584
        first, second = document.name.split(" + ")
        assert (words[0], words[document.split_token - 1]) == (f"{first}w0", f"{first}w{document.split_token - 1}")
        assert words[document.split_token] == f"{second}w0"
        assert document.categories == (first.rstrip("0123456789"), second.rstrip("0123456789"))
        assert [C.depth_bin(q.depth) for q in document.queries] == [
            f"{lo}-{hi}" for lo, hi in C.DEPTH_BINS if lo + 64 < document.num_tokens][: len(document.queries)]
        for query in document.queries:
            assert query.document == index
            passage = query.text.split()
            assert len(passage) == 64 and passage == words[query.depth: query.depth + 64]
    again = C.build_documents(sources, "held_out", 12, word_offsets, min_tokens=1024, max_tokens=3584)
    assert [(d.name, d.text) for d in again] == [(d.name, d.text) for d in documents]


def test_running_out_of_sources_says_which():
    with pytest.raises(ValueError, match="no held_out .* source"):
        C.build_documents(hand_made_sources(per_category=3), "held_out", 50, word_offsets)


def test_sources_are_deduplicated_and_categorised():
    text = "the same copyright text " * 200
    kept = C.unique_sources([C.Source("a/copyright", "license", text), C.Source("b/copyright", "license", text),
                             C.Source("short", "readme", "too short")])
    assert [s.name for s in kept] == ["a/copyright"]
    assert [C.doc_category(Path(p)) for p in ("x/changelog.Debian.gz", "x/NEWS.gz", "x/copyright",
                                              "x/README.md.gz", "x/guide.txt", "x/logo.png")] == [
        "changelog", "changelog", "license", "readme", "readme", None]


def test_module_docstrings_in_source_order(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Module."""\ndef f():\n    """F."""\nclass K:\n    """K."""\n    def g(self):\n'
                      '        """G."""\n')
    assert C.module_docstrings(module) == "Module.\n\nF.\n\nK.\n\nG."


def test_ranks_recall_and_reciprocal_rank_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.3],    # target 0 ranks 1
                           [0.5, 0.2, 0.7],    # target 1 ranks 3
                           [0.4, 0.4, 0.1]])   # target 0 ties with 1: counted as rank 2
    rank = M.ranks(scores, [0, 1, 0])
    assert rank.tolist() == [1, 3, 2]
    assert M.recall_at_1(rank).tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(M.reciprocal_rank(rank), [1.0, 1 / 3, 0.5])


def test_paired_bootstrap_interval():
    assert M.paired_bootstrap_ci(np.ones(5), np.ones(5)) == (0.0, 0.0, 0.0)
    assert M.paired_bootstrap_ci(np.ones(5), np.zeros(5)) == (1.0, 1.0, 1.0)
    # 100 pairs, half won by a: mean 0.5, standard error 0.05, so the 95% interval is about 0.40..0.60
    a, b = np.r_[np.ones(50), np.zeros(50)], np.zeros(100)
    mean, low, high = M.paired_bootstrap_ci(a, b)
    assert mean == 0.5 and 0.38 < low < 0.44 and 0.56 < high < 0.62
    # pairing matters: a and b equal item by item differ by exactly 0 even though both vary
    assert M.paired_bootstrap_ci(a, a.copy())[1:] == (0.0, 0.0)
    assert np.isnan(M.paired_bootstrap_ci(np.array([]), np.array([]))[0])


def test_probe_reads_separable_labels_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(60, 4)).astype(float)
    separable = np.hstack([labels * 4 + rng.normal(0, 0.3, labels.shape), rng.normal(0, 1, (60, 8))])
    assert M.multilabel_probe_correct(separable, labels).mean() == 1.0
    noise = rng.normal(0, 1, (60, 12))
    assert M.multilabel_probe_correct(noise, labels).mean() < 0.3  # four coin flips right: 1/16 by chance


def test_scores_by_depth_bin():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    table = by_depth(values, np.array([10, 600, 700, 1500, 3000]))
    assert list(table) == BINS
    assert table["0-512"] == {"n": 1, "mean": 1.0} and table["512-1024"] == {"n": 2, "mean": 0.5}
    assert table[PAST_512] == {"n": 4, "mean": 0.5} and table["all"]["mean"] == 0.6


def machine_has_sources() -> bool:
    return Path("/usr/share/doc").is_dir() and Path("/usr/share/common-licenses").is_dir()


@pytest.mark.skipif(not machine_has_sources(), reason="needs /usr/share/doc, common-licenses and the stdlib")
def test_quick_benchmark_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from benchmarks.quality.run import main

    report = main(["--quick", "--out", str(tmp_path)])
    methods = set(report["summary"])
    assert {"truncate-256", "chunk-mean-512", "best-chunk-256", "lsg-norm", "lsg-lsh", "lsg-norm-block64"} <= methods
    assert "accuracy" not in report["summary"]["best-chunk-256"] and "accuracy" in report["summary"]["lsg-norm"]
    assert report["summary"]["lsg-norm"]["recall@1"]["all"]["n"] >= 12
    assert {r["bin"] for r in report["differences"]} == set(BINS)
    assert (tmp_path / "quality_by_depth.png").stat().st_size > 10_000
    assert "Paired differences" in (tmp_path / "results.md").read_text()


@pytest.mark.skipif(not machine_has_sources(), reason="needs /usr/share/doc, common-licenses and the stdlib")
def test_quick_finetuning_trains_and_compares(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    """... and writes its report outside the committed results (benchmarks/out, which git ignores)."""
    namespace = runpy.run_path(str(ROOT / "examples" / "finetune_long.py"), run_name="finetune_long")
    written = []
    namespace["main"].__globals__["write_report"] = lambda folder, *args: written.append(folder)
    report = namespace["main"](["--quick"])
    assert written == [ROOT / "benchmarks" / "out" / "finetune-quick"]
    assert set(report["training"]) == {"ft-lsg-global", "ft-lsg-all", "ft-chunks"}
    for run in report["training"].values():
        assert len(run["losses"]) == 2 and all(np.isfinite(run["losses"]))
    trained = {label: run["trained_parameters"] for label, run in report["training"].items()}
    assert trained["ft-lsg-global"] == 512 * 32 < trained["ft-lsg-all"]  # the tiny model's 512 global rows
    assert {"ft-lsg-all", "ft-lsg-global", "ft-chunk-mean-256", "lsg-norm", "chunk-mean-256"} <= set(report["summary"])
    assert any(r["a"] == "ft-lsg-all" and r["b"] == "ft-chunk-mean-256" for r in report["differences"])


class WordIds:
    """A tokenizer stand-in: one id per distinct word, so every token can be traced to its source."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.ids: dict[str, int] = {}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.ids.setdefault(w, len(self.ids)) for w in t.split()] for t in texts]}

    def source(self, token: int) -> str:
        return next(w for w, i in self.ids.items() if i == token).rsplit("w", 1)[0]


def test_finetuning_batches_are_windows_with_their_passage_and_one_kind_of_text():
    namespace = runpy.run_path(str(ROOT / "examples" / "finetune_long.py"), run_name="finetune_long")
    documents = C.build_documents(hand_made_sources(per_category=60), "train", 40, word_offsets)
    tokenizer = WordIds()
    batches = namespace["training_batches"](documents, tokenizer, 12, 4, 512)
    assert len(batches) == 12
    single_kind = 0
    for batch in batches:
        sources = [tokenizer.source(e.query[0]) for e in batch]
        names = [d.name for d in documents for s in sources if s in d.name.split(" + ")]
        assert len(set(names)) == len(batch)  # never one document twice
        for example in batch:
            assert len(example.window) <= 512 and len(example.query) == 64
            assert any(example.window[k: k + 64] == example.query for k in range(len(example.window) - 63))
        single_kind += len({s.rstrip("0123456789") for s in sources}) == 1
    assert single_kind >= 9  # only the remainders of each epoch mix kinds


@pytest.mark.skipif(not machine_has_sources(), reason="needs /usr/share/doc, common-licenses and the stdlib")
def test_quick_split_binding_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from benchmarks.quality.split_binding import main

    report = main(["--quick", "--out", str(tmp_path)])
    assert {"truncate-512", "chunk-mean-128", "best-chunk-256", "late512-best-256", "late-lsg-best-128",
            "lsg"} <= set(report["summary"])
    twin = report["summary"]["lsg"]["twin accuracy"]
    assert twin["all"]["n"] == 2 and 0 <= twin["all"]["mean"] <= 1
    assert all(0.01 <= s["mrr"]["all"]["mean"] <= 1 for s in report["summary"].values())
    assert (tmp_path / "quality_by_distance.png").stat().st_size > 10_000
    assert "Paired differences, Twin accuracy" in (tmp_path / "results.md").read_text()


def test_split_binding_twin_swaps_only_the_maintainers():
    import random

    from benchmarks.quality.split_binding import make_pair

    text = " ".join(f"w{i}" for i in range(400))
    pair = make_pair(text, word_offsets(text), 256, random.Random(0))
    true_key, distractor_key = pair.candidates[0].split()[-1].rstrip("."), pair.candidates[1].split()[-1].rstrip(".")
    module = pair.candidates[0].split()[5]
    for document in (pair.document, pair.twin):
        assert re.findall(r"\bw\d+", document) == text.split()  # the original words all there, in order

    def team_of(document: str) -> str:
        return re.search(rf"Module {module} is maintained by team (\w+)\.", document).group(1)

    assert f"Team {team_of(pair.document)}'s release key is {true_key}." in pair.document
    assert f"Team {team_of(pair.twin)}'s release key is {distractor_key}." in pair.twin
    assert re.sub(r"team \w+\.", "", pair.document) == re.sub(r"team \w+\.", "", pair.twin)  # only teams differ
    between = pair.document.split("is maintained by")[-1].split("release key")[0]
    assert 250 <= len(re.findall(r"\bw\d+", between)) <= 257  # d = 256 words between the two fact pairs


@pytest.mark.skipif(not machine_has_sources(), reason="needs the stdlib sources")
def test_quick_late_chunking_benchmark_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from benchmarks.quality.late_chunking import main

    report = main(["--quick", "--out", str(tmp_path)])
    assert {"naive-128", "late512-256", "late-lsg-128", "ceiling-256"} <= set(report["summary"])
    assert report["summary"]["naive-128"]["recall@1"]["all"]["n"] == len(report["queries"]) > 5
    assert all("." in q["query"].split(":")[0] for q in report["queries"])  # Class.method
    assert (tmp_path / "quality_by_distance.png").stat().st_size > 10_000


def test_late_chunking_queries_are_methods_defined_in_several_classes():
    from benchmarks.quality.late_chunking import read_source

    class Words:  # one token per word, offsets in characters
        def __call__(self, text, **_):
            spans = word_offsets(text)
            return {"input_ids": list(range(len(spans))), "offset_mapping": spans}

    source = ('class A:\n    def run(self):\n        """Run A."""\n\n    def only_a(self):\n        pass\n'
              'class B:\n    x = 1\n    def run(self):\n        pass\n')
    parsed = read_source("m.py", source, Words())
    assert [q.text for q in parsed.queries] == ["A.run: Run A.", "B.run"]
    assert [q.distance for q in parsed.queries] == [2, 5]  # words from the class line to the def line
    assert [line for _, _, line in parsed.classes] == ["class A:", "class B:"]
