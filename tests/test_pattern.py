"""The attention-pattern matrix against the dense oracle's key lists and the attention product itself,
and the picture drawn from it."""
from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lsg_patch
from lsg_patch.attention import lsg_attention, prepare_mask
from lsg_patch.pattern import (
    FULL,
    GLOBAL,
    LOCAL,
    NOT_ATTENDED,
    SPARSE,
    SPARSE_REGION,
    attention_pattern,
    pattern_figure,
)
from tests.oracle import attended_keys, norm_chunk, selection
from tests.tiny_models import tiny_model

POSITION_SELECTIONS = {"raw", "stride", "block_stride"}
ALL_TYPES = ["none", "norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling"]


@st.composite
def configs(draw: st.DrawFn) -> tuple[lsg_patch.LSGConfig, int, int]:
    bs = draw(st.sampled_from([2, 4, 8]))
    lsg = lsg_patch.LSGConfig(
        block_size=bs,
        sparsity_factor=draw(st.sampled_from([f for f in range(1, bs + 1) if bs % f == 0])),
        sparse_block_size=draw(st.integers(0, 2 * bs)),
        sparsity_type=draw(st.sampled_from(ALL_TYPES)),
        num_global_tokens=draw(st.integers(1, 3)),
        mask_first_token=draw(st.booleans()),
    )
    return lsg, draw(st.integers(1, 12 * bs)), draw(st.integers(0, 3))


def padded(lsg: lsg_patch.LSGConfig, length: int) -> int:
    if length <= 2 * lsg.block_size or length % lsg.block_size == 0:
        return length
    return length + lsg.block_size - length % lsg.block_size


def item_region(lsg: lsg_patch.LSGConfig, item: int) -> range:
    """Tokens a pooled/chosen sparse item is computed from (written out here independently of pattern.py)."""
    sf = lsg.sparsity_factor
    if selection(lsg.layout) in {"pooling", "bos_pooling"}:
        return range(item * sf, item * sf + sf)
    chunk = norm_chunk(lsg.layout)
    first = item // (chunk // sf) * chunk
    return range(first, first + chunk)


def expected_pattern(lsg: lsg_patch.LSGConfig, length: int, head: int) -> torch.Tensor:
    """The pattern built from the oracle's per-row key lists."""
    g, t = lsg.num_global_tokens, padded(lsg, length)
    kind_of = {"global": GLOBAL, "local": FULL if t <= 2 * lsg.block_size else LOCAL}
    exact = selection(lsg.layout) in POSITION_SELECTIONS
    expected = torch.zeros(g + t, g + t, dtype=torch.uint8)
    for row, keys in enumerate(attended_keys(lsg.layout, t, head=head)):
        if row < g:
            expected[row] = GLOBAL
            continue
        for index, kind in sorted(keys, key=lambda k: ("sparse", "local", "global").index(k[1])):
            if kind == "sparse":
                columns = [g + index] if exact else [g + i for i in item_region(lsg, index)]
                expected[row, columns] = SPARSE if exact else SPARSE_REGION
            else:
                expected[row, index if kind == "global" else g + index] = kind_of[kind]
    if lsg.mask_first_token:
        expected[:, g] = NOT_ATTENDED
    return expected[: g + length, : g + length]


@settings(max_examples=150, deadline=None)
@given(configs())
def test_pattern_equals_the_oracle_key_sets(case):
    lsg, length, head = case
    assert torch.equal(attention_pattern(lsg, length, head), expected_pattern(lsg, length, head))


@settings(max_examples=60, deadline=None)
@given(configs(), st.integers(0, 2**31))
def test_pattern_is_what_the_attention_product_attends(case, seed):
    """One-hot values make each output row the attention weights over the keys: its support must be the
    pattern row (position types) or lie inside it (data-dependent types)."""
    lsg, length, head = case
    g, t = lsg.num_global_tokens, padded(lsg, length)
    size = g + t
    generator = torch.Generator().manual_seed(seed)
    query, key = torch.randn(2, 1, head + 1, size, size, generator=generator, dtype=torch.float64)
    value = torch.eye(size, dtype=torch.float64).expand(1, head + 1, size, size)
    token_mask = torch.arange(t)[None] < length
    if lsg.mask_first_token:
        token_mask[0, 0] = False
    weights = lsg_attention(query, key, value, prepare_mask(token_mask, lsg.layout), lsg.layout)[0, head]
    support = weights[: g + length, : g + length] > 0
    pattern = attention_pattern(lsg, length, head) != NOT_ATTENDED
    if selection(lsg.layout) in POSITION_SELECTIONS | {"none"} or t <= 2 * lsg.block_size:
        assert torch.equal(support, pattern)
    else:
        assert not (support & ~pattern).any()


def test_stride_example_written_out():
    """block 4, step 2, sparse windows of 2 items: block 1 (tokens 4..7) has local tokens 0..11, before window
    items -2..-1 (none) and after window items 6, 7 = tokens 12, 14 (head 0) or 13, 15 (head 1)."""
    lsg = lsg_patch.LSGConfig(block_size=4, sparse_block_size=2, sparsity_factor=2, sparsity_type="stride")
    for head, sparse in ((0, [12, 14]), (1, [13, 15]), (2, [12, 14])):
        pattern = attention_pattern(lsg, 24, head)
        row = pattern[1 + 5, 1:]  # token 5, in block 1
        assert row[:12].eq(LOCAL).all()
        assert (row == SPARSE).nonzero().flatten().tolist() == sparse
        assert row[12:].eq(SPARSE).sum() == 2 and row[12:].eq(LOCAL).sum() == 0
        # block 3 (tokens 12..15): before window items 2, 3 = tokens 4, 6 (+ head residue)
        residue = head % 2
        assert (pattern[1 + 13, 1:] == SPARSE).nonzero().flatten().tolist() == [4 + residue, 6 + residue, 20 + residue,
                                                                               22 + residue]


@pytest.mark.parametrize("sparsity_type", ALL_TYPES)
def test_local_band_and_globals(sparsity_type):
    lsg = lsg_patch.LSGConfig(block_size=8, sparse_block_size=4, sparsity_factor=4, sparsity_type=sparsity_type,
                              num_global_tokens=3)
    pattern = attention_pattern(lsg, 80, head=1)
    assert pattern.shape == (83, 83)
    assert pattern[:3].eq(GLOBAL).all() and pattern[:, :3].eq(GLOBAL).all()
    tokens = pattern[3:, 3:]
    for query in range(80):
        block = query // 8
        local = (tokens[query] == LOCAL).nonzero().flatten()
        first, last = max(0, (block - 1) * 8), min(80, (block + 2) * 8)
        assert local.tolist() == list(range(first, last))
    assert tokens.eq(SPARSE if sparsity_type in ("stride", "block_stride") else SPARSE_REGION).any() == (
        sparsity_type != "none"
    )


def test_short_input_is_full_attention_and_padding_is_cropped():
    lsg = lsg_patch.LSGConfig(block_size=8, sparse_block_size=8, sparsity_factor=2)
    short = attention_pattern(lsg, 16)
    assert short[1:, 1:].eq(FULL).all() and short[0].eq(GLOBAL).all()
    assert attention_pattern(lsg, 29).shape == (30, 30)  # padded to 32 tokens inside, cropped to the input
    with pytest.raises(ValueError, match="adaptive"):
        attention_pattern(lsg_patch.LSGConfig(block_size=8, adaptive=False, sparse_block_size=8), 29)


def test_model_and_config_sources_agree_and_bad_input_is_refused():
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, block_size=8, sparse_block_size=4,
                             sparsity_factor=2, sparsity_type="block_stride", num_global_tokens=2)
    lsg = lsg_patch.LSGConfig(block_size=8, sparse_block_size=4, sparsity_factor=2, sparsity_type="block_stride",
                              num_global_tokens=2)
    assert torch.equal(attention_pattern(model, 100, head=3), attention_pattern(lsg, 100, head=3))
    assert torch.equal(attention_pattern(model.config, 100, head=3), attention_pattern(lsg, 100, head=3))
    with pytest.raises(ValueError, match="max_length=128"):
        attention_pattern(model, 129)
    with pytest.raises(ValueError, match="4 heads"):
        attention_pattern(model, 64, head=4)
    for length in (0, 2.5, True):
        with pytest.raises(ValueError, match="length="):
            attention_pattern(lsg, length)
    with pytest.raises(ValueError, match="LSG settings"):
        attention_pattern(tiny_model("bert"), 64)


def test_legend_says_data_dependent_types_show_a_region():
    pytest.importorskip("matplotlib", reason="figures need the plot extra (pip install matplotlib)")

    def labels(sparsity_type: str) -> list[str]:
        lsg = lsg_patch.LSGConfig(block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type=sparsity_type)
        return [text.get_text() for text in pattern_figure(lsg, 64).axes[0].get_legend().get_texts()]

    assert any("computed from (data-dependent)" in label for label in labels("norm"))
    assert any("exact sparse keys" in label for label in labels("stride"))
    assert not any("sparse" in label for label in labels("none"))
    assert any(label.startswith("local") for label in labels("none"))


def test_plot_pattern_writes_a_png_with_the_kind_colours(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image", reason="figures need the plot extra (pip install matplotlib)")
    lsg = lsg_patch.LSGConfig(block_size=16, sparse_block_size=8, sparsity_factor=4, sparsity_type="stride")
    path = lsg_patch.plot_pattern(lsg, 128, tmp_path / "pattern.png", dpi=60)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = (matplotlib_image.imread(path)[..., :3] * 255).round().reshape(-1, 3)
    colours = {tuple(p) for p in pixels.tolist()}
    for hex_colour in ("#3a7dc9", "#e8772e", "#2e9e5b"):  # local, sparse, global
        assert tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)) in colours


def test_missing_matplotlib_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        lsg_patch.plot_pattern(lsg_patch.LSGConfig(), 64, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
