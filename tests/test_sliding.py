"""ModernBERT's sliding-window layers in linear memory ("lsg_sliding", lsg_patch.attention.sliding).

Oracle: transformers' own bidirectional sliding-window mask (`create_bidirectional_sliding_window_mask`, the mask
the sliding layers were given before) over [globals; tokens; padding] with the padding masked, and plain softmax
attention in float64, written here; a query that sees no key gets zeros (what torch's SDPA gives it).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AttentionInterface, ModernBertConfig
from transformers.masking_utils import create_bidirectional_sliding_window_mask

import lsg_patch
from lsg_patch import seam
from lsg_patch.attention.sliding import sliding_window_attention
from lsg_patch.config import LSGConfig
from lsg_patch.families.base import build_call
from tests.helpers import MAX_LENGTH, batch_inputs
from tests.tiny_models import build

LSG = dict(block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type="norm", num_global_tokens=2)


def windowed_mask(window: int, key_mask: torch.Tensor) -> torch.Tensor:
    """(batch, n, n) bool: transformers' sliding-window mask of a ModernBERT with this half window."""
    config = ModernBertConfig(local_attention=2 * window, attn_implementation="sdpa")
    embeds = torch.zeros(*key_mask.shape, 1)
    mask = create_bidirectional_sliding_window_mask(config=config, inputs_embeds=embeds, attention_mask=key_mask)
    if mask is None:  # transformers skips the mask when nothing is masked and the window covers everything
        return torch.ones(key_mask.shape[0], key_mask.shape[1], key_mask.shape[1], dtype=torch.bool)
    return mask[:, 0]


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Softmax attention (batch, heads, n, d) under a (batch, n, n) mask; key heads repeated for their groups."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~allowed[:, None], float("-inf"))
    seen = allowed[:, None].any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~seen, 0), dim=-1) * seen
    return weights @ value


@st.composite
def cases(draw: st.DrawFn) -> dict:
    heads, kv_heads = draw(st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1)]))
    batch = draw(st.integers(1, 2))
    tokens = draw(st.integers(1, 70))
    rows = []
    for _ in range(batch):  # trailing padding (as the tokenizer pads) or any pattern
        if draw(st.booleans()):
            rows.append(torch.arange(tokens) < draw(st.integers(1, tokens)))
        else:
            rows.append(torch.tensor(draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens))))
    return dict(heads=heads, kv_heads=kv_heads, batch=batch, tokens=tokens, token_mask=torch.stack(rows),
                globals_=draw(st.integers(0, 4)), window=draw(st.integers(0, 20)), seed=draw(st.integers(0, 99)))


def qkv(case: dict, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(case["seed"])
    n = case["globals_"] + case["tokens"]
    shapes = [(case["batch"], case["heads"], n, 8)] + [(case["batch"], case["kv_heads"], n, 8)] * 2
    return tuple(torch.randn(*s, generator=generator, dtype=dtype).requires_grad_() for s in shapes)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_matches_transformers_windowed_mask_forward_and_gradients(case: dict) -> None:
    query, key, value = qkv(case)
    keys = torch.cat([torch.ones(case["batch"], case["globals_"], dtype=torch.bool), case["token_mask"]], dim=1)
    got = sliding_window_attention(query, key, value, keys, case["window"], scale=0.3)
    expected = dense_attention(query, key, value, windowed_mask(case["window"], keys), 0.3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(got, (query, key, value), upstream)
    expected_grads = torch.autograd.grad(expected, (query, key, value), upstream)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(cases(), st.booleans())
def test_the_seam_function_masks_the_calls_tokens_behind_the_globals(case: dict, mask_first_token: bool) -> None:
    """Through the "lsg_sliding" function: G unmasked globals in front of the call's tokens; mask_first_token
    (an LSG option) leaves the sliding layers' keys alone, as transformers' own sliding mask did."""
    case = {**case, "globals_": max(case["globals_"], 1)}  # an LSG model has at least one global token
    query, key, value = (t.detach().float() for t in qkv(case))
    lsg = LSGConfig(block_size=64, num_global_tokens=case["globals_"], mask_first_token=mask_first_token)
    call = build_call(case["token_mask"], case["tokens"], lsg)
    module = nn.Module()
    module.config = SimpleNamespace(sliding_window=case["window"])
    got, weights = seam.sliding_attention_function(module, query, key, value, None, scaling=0.3, lsg_call=call)
    keys = torch.cat([torch.ones(case["batch"], lsg.num_global_tokens, dtype=torch.bool), case["token_mask"]], dim=1)
    expected = dense_attention(query.double(), key.double(), value.double(), windowed_mask(case["window"], keys), 0.3)
    assert weights is None
    torch.testing.assert_close(got, expected.transpose(1, 2).float(), rtol=0, atol=1e-5)


def test_dropout_keeps_the_window_and_trains() -> None:
    """Each draw drops some of the window's weights; averaged over 300 draws, output and q/k/v gradients approach
    the dropout-free ones (mean error ~0.01, a window of 3 or 12 instead of 6 is off by 0.2-0.3): the dropped weights
    are the window's, rescaled by 1 / (1 - p), and the backward follows the same keep-mask."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 50, 8, generator=generator, dtype=torch.float64, requires_grad=True)
                         for _ in range(3))
    upstream = torch.randn(2, 4, 50, 8, generator=generator, dtype=torch.float64)
    keys = torch.ones(2, 50, dtype=torch.bool)

    def output_and_gradients(**dropout: float) -> list[torch.Tensor]:
        output = sliding_window_attention(query, key, value, keys, 6, **dropout)
        return [output.detach(), *torch.autograd.grad((output * upstream).sum(), (query, key, value))]

    plain = output_and_gradients()
    torch.manual_seed(0)
    draws = [output_and_gradients(dropout_p=0.3) for _ in range(300)]
    assert (draws[0][0] - plain[0]).abs().mean() > 0.1
    for index, expected in enumerate(plain):
        average = torch.stack([draw[index] for draw in draws]).mean(0)
        assert (average - expected).abs().mean() < 0.03


@pytest.mark.parametrize(("argument", "message"), [
    (dict(window=-1), "window=-1 is not accepted"),
    (dict(window=True), "window=True is not accepted"),
    (dict(key_mask=torch.ones(2, 9, dtype=torch.long)), r"key_mask must be a \(2, 9\) bool tensor"),
    (dict(key=torch.zeros(2, 3, 9, 8)), "4 query heads cannot share 3 key heads"),
    (dict(key=torch.zeros(2, 4, 5, 8)), "got 9 queries and 5 keys"),
])  # fmt: skip
def test_bad_arguments_are_named(argument: dict, message: str) -> None:
    arguments = dict(query=torch.zeros(2, 4, 9, 8), key=torch.zeros(2, 4, 9, 8), value=torch.zeros(2, 4, 9, 8),
                     key_mask=torch.ones(2, 9, dtype=torch.bool), window=3)
    arguments.update(argument)
    if "key" in argument:
        arguments["value"] = arguments["key"]
    with pytest.raises(ValueError, match=message):
        sliding_window_attention(**arguments)


def sliding_layers(model: nn.Module) -> list[nn.Module]:
    return [layer.attn for layer in model.base_model.layers if layer.attention_type == "sliding_attention"]


def test_modernbert_builds_no_dense_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither transformers' windowed (n, n) mask nor its full one is built for a converted ModernBERT."""
    model = lsg_patch.to_lsg(build("modernbert", "Model"), max_length=MAX_LENGTH, **LSG)

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a dense mask was built")

    modeling = "transformers.models.modernbert.modeling_modernbert"
    for name in ("create_bidirectional_sliding_window_mask", "create_bidirectional_mask"):
        monkeypatch.setattr(f"{modeling}.{name}", refuse)
        monkeypatch.setattr(f"transformers.masking_utils.{name}", refuse)
    calls = []
    original = seam.sliding_attention_function
    monkeypatch.setitem(AttentionInterface._global_mapping, "lsg_sliding",
                        lambda module, *a, **k: calls.append(module) or original(module, *a, **k))
    with torch.no_grad():
        model(**batch_inputs(model, "Model"))
    assert calls == sliding_layers(model)


def test_modernbert_sliding_layers_train_with_dropout() -> None:
    model = lsg_patch.to_lsg(build("modernbert", "Model", attention_dropout=0.3), max_length=MAX_LENGTH, **LSG)
    model.train()
    model(**batch_inputs(model, "Model")).last_hidden_state.square().mean().backward()
    for module in sliding_layers(model):
        assert torch.isfinite(module.Wqkv.weight.grad).all() and module.Wqkv.weight.grad.abs().sum() > 0


def test_selection_print_and_from_lsg() -> None:
    plain = build("modernbert", "Model")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LSG)
    configs = {name: module.config for name, module in plain.named_modules() if hasattr(module, "config")}
    for module in sliding_layers(model):
        assert module.config._attn_implementation == "lsg_sliding" and not hasattr(module.config, "lsh_seed")
        assert "attn_implementation='lsg_sliding', sliding_window=8" in repr(module)
    assert "attn_implementation='lsg', num_global_tokens=2, block_size=8" in repr(model.layers[0].attn)
    assert model.config._attn_implementation == plain.config._attn_implementation
    lsg_patch.from_lsg(model)
    assert "lsg" not in repr(model) and not seam.selected_modules(model)
    assert all(module.config is model.config for name, module in model.named_modules() if name in configs)
    inputs = batch_inputs(plain, "Model", length=40, padded_length=30)
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, plain(**inputs).last_hidden_state)


def test_save_and_reload_under_enabled_is_bit_exact(tmp_path) -> None:  # noqa: ANN001
    model = lsg_patch.to_lsg(build("modernbert", "ForMaskedLM"), max_length=MAX_LENGTH, **LSG)
    model.save_pretrained(tmp_path)
    with lsg_patch.enabled():
        again = type(model).from_pretrained(tmp_path).eval()
    assert [m.config._attn_implementation for m in sliding_layers(again)] == ["lsg_sliding"] * 2
    inputs = batch_inputs(model, "ForMaskedLM")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)


def test_a_foreign_lsg_sliding_function_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(AttentionInterface._global_mapping, "lsg_sliding", lambda *args, **kwargs: None)
    model = build("modernbert", "Model")
    with pytest.raises(RuntimeError, match="already holds another function under 'lsg_sliding'"):
        lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    assert not lsg_patch.is_lsg_model(model) and not seam.selected_modules(model)
