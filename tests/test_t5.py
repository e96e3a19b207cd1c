"""T5-style relative position bias inside LSG key sets (docs/LSG_SPEC.md section 7c), and the T5 family.

The product's bias is checked against the dense oracle, which adds T5's own bucket formula
(`T5Attention._relative_position_bucket`) to the scores of the keys it lists for every row.
"""
from __future__ import annotations

import copy
import os
from functools import partial
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig
from transformers.models.t5.modeling_t5 import T5Attention
from transformers.models.umt5.modeling_umt5 import UMT5Attention

import lsg_patch
from lsg_patch.attention import AttentionLayout, RelativeBias, lsg_attention, prepare_mask
from lsg_patch.attention.backends import BACKEND_VARIABLE
from tests.helpers import EXACT_TYPES, LOCAL_LSG, Case
from tests.helpers import attention_cases as cases
from tests.helpers import t5_oracle_encoder as oracle_encoder
from tests.oracle import oracle_attention
from tests.tiny_models import build


def t5_bias(heads: int, num_buckets: int, max_distance: int, seed: int) -> RelativeBias:
    table = torch.randn(num_buckets, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bucket = partial(T5Attention._relative_position_bucket, bidirectional=True, num_buckets=num_buckets,
                     max_distance=max_distance)
    return RelativeBias(table, bucket)


def oracle_bias(bias: RelativeBias):
    """The oracle's bias(head, distance): T5's bucket of one distance, looked up in the table."""
    return lambda head, distance: float(bias.table[int(bias.bucket(torch.tensor(distance))), head])


# T5's formula divides by log(max_distance / max_exact), max_exact = num_buckets // 4: max_distance must exceed it
buckets = st.sampled_from([4, 8, 32]).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(n // 4 + 1, 160), st.integers(0, 2**31)))


@pytest.mark.parametrize("backend", ["cpu_fused", "portable"])
@pytest.mark.parametrize("kind", EXACT_TYPES)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_bias_matches_the_oracle(backend: str, kind: str, data: st.DataObject) -> None:
    case: Case = data.draw(cases(types=[kind]))
    num_buckets, max_distance, seed = data.draw(buckets)
    causal = data.draw(st.booleans())  # T5 encoders are bidirectional; the product takes a bias in both modes
    bias = t5_bias(case.query.shape[1], num_buckets, max_distance, seed)
    with mock.patch.dict(os.environ, {BACKEND_VARIABLE: backend}):
        got = lsg_attention(case.query, case.key, case.value, case.mask(), case.layout, scale=case.scale, bias=bias,
                            causal=causal)
    want = oracle_attention(case.query, case.key, case.value, case.token_mask, case.layout, scale=case.scale,
                            bias=oracle_bias(bias), causal=causal)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("block_size", "factor", "by_direction"), [
    (128, 2, True),    # T5's defaults: every distance past a block is in the last bucket of its direction
    (64, 2, False),    # distances 65..90 still have buckets of their own
    (96, 32, False),   # an odd sparse step (3): the after window reaches into the local window
])
@pytest.mark.parametrize("causal", [False, True])
def test_side_bias_is_one_value_per_head_and_direction_when_the_buckets_allow(
        block_size: int, factor: int, by_direction: bool, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The (batch, heads, B, bs, Ks) side bias is not built when the buckets cannot tell the side keys apart; the
    outputs match the oracle either way (test_bias_matches_the_oracle)."""
    layout = AttentionLayout(num_global_tokens=2, block_size=block_size, sparse_block_size=block_size,
                             sparsity_factor=factor, sparsity_type="pooling")
    bias = t5_bias(3, 32, 128, 0)
    built = []
    monkeypatch.setattr(RelativeBias, "same_for_heads", lambda self, distance, *args: built.append(
        tuple(distance.shape)) or RelativeBias.by_distance(self, *args)[distance.clamp(-args[0], args[0]) + args[0]]
        .movedim(-1, 0))
    tokens = 4 * block_size
    query, key, value = torch.randn(3, 1, 3, 2 + tokens, 8, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(block_size))
    lsg_attention(query, key, value, prepare_mask(torch.ones(1, tokens, dtype=torch.bool), layout), layout,
                  bias=bias, causal=causal)
    side_shapes = [shape for shape in built if len(shape) == 4]  # (1, B, bs, Ks): the per-key side bias
    assert bool(side_shapes) != by_direction, built


@pytest.mark.parametrize("trainable", [True, False])  # False: the fused CPU backward, with the bias in its masks
@settings(max_examples=10, deadline=None)
@given(cases(long_only=True), buckets)
def test_gradients_match_the_oracle(trainable: bool, case: Case, bucket_settings: tuple[int, int, int]) -> None:
    """Gradients of queries, keys, values and (when it trains) the bias table."""
    bias = t5_bias(case.query.shape[1], *bucket_settings)

    def gradients(function, bias_of):  # noqa: ANN001, ANN202
        table = bias.table.clone().requires_grad_(trainable)
        inputs = [x.clone().requires_grad_() for x in (case.query, case.key, case.value)]
        out = function(*inputs, case.mask() if function is lsg_attention else case.token_mask, case.layout,
                       scale=case.scale, bias=bias_of(table))
        weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
        return torch.autograd.grad((out * weights).sum(), inputs + [table] * trainable)

    got = gradients(lsg_attention, lambda table: RelativeBias(table, bias.bucket))
    want = gradients(oracle_attention,
                     lambda table: lambda head, distance: table[int(bias.bucket(torch.tensor(distance))), head])
    for name, g, w in zip(("query", "key", "value", "table"), got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# Model level: sparsity_type "none", where LSG is dense attention over [globals; local keys] with T5's bias
# between tokens and none for the global rows and columns (section 7c).

MODEL_TYPES = ["t5", "mt5", "umt5"]
LSG = LOCAL_LSG
MAX_LENGTH, LENGTH, PADDED = 128, 48, 30  # 6 whole blocks, no block padding


def inputs(length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 99, (2, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, PADDED:] = 0
    ids[1, PADDED:] = 0
    return ids, mask


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_encoder_matches_the_dense_oracle_and_the_decoder_is_untouched(model_type: str) -> None:
    plain = build(model_type, "Model", attn_implementation="eager")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LSG)
    ids, mask = inputs()
    decoder_ids = torch.randint(5, 99, (2, 7), generator=torch.Generator().manual_seed(5))
    g = LSG["num_global_tokens"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False)
        expected = oracle_encoder(plain, model, ids, mask)
        encoded = out.encoder_last_hidden_state
        decoded = plain.decoder(input_ids=decoder_ids, encoder_hidden_states=encoded,
                                encoder_attention_mask=torch.cat([torch.ones(2, g, dtype=mask.dtype), mask], 1))
    assert encoded.shape == (2, g + LENGTH, plain.config.d_model)
    valid = torch.cat([torch.ones(2, g, dtype=torch.bool), mask.bool()], 1)
    assert (encoded - expected)[valid].abs().max().item() < 1e-5
    assert torch.equal(out.last_hidden_state, decoded.last_hidden_state), "the decoder differs on the same states"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_encoder_model_drops_the_global_rows(model_type: str) -> None:
    plain = build(model_type, "EncoderModel", attn_implementation="eager")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LSG)
    ids, mask = inputs()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = oracle_encoder(plain, model, ids, mask)
    pooled = torch.cat([expected[:, :1], expected[:, LSG["num_global_tokens"] + 1:]], dim=1)  # pool_with_global
    assert hidden.shape == (2, LENGTH, plain.config.d_model)
    assert (hidden - pooled)[mask.bool()].abs().max().item() < 1e-5


@pytest.mark.parametrize("attention_class", [T5Attention, UMT5Attention])
def test_encoder_never_builds_a_dense_bias(attention_class: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """compute_bias (the (1, heads, n, n) tensor) runs for the decoder only; sparse keys get their bias too."""
    model_type = "t5" if attention_class is T5Attention else "umt5"
    model = lsg_patch.to_lsg(build(model_type, "ForConditionalGeneration"), max_length=MAX_LENGTH, block_size=8,
                             sparsity_type="pooling", num_global_tokens=2)
    calls = []
    original = attention_class.compute_bias

    def recording(self: torch.nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(self.is_decoder)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attention_class, "compute_bias", recording)
    ids, mask = inputs(75)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5], use_cache=False)
    assert calls and all(calls), "the LSG encoder called compute_bias"


def test_dense_position_bias_is_refused() -> None:
    model = lsg_patch.to_lsg(build("t5", "EncoderModel"), max_length=MAX_LENGTH, **LSG)
    ids, _ = inputs()
    first = model.encoder.block[0].layer[0].SelfAttention
    dense = first.compute_bias(LSG["num_global_tokens"] + LENGTH, LSG["num_global_tokens"] + LENGTH)
    hook = first.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "position_bias": dense}),
                                           with_kwargs=True)  # runs before lsg_patch's hook, which then keeps it
    with pytest.raises(ValueError, match="dense position_bias of shape"):
        model(input_ids=ids)
    hook.remove()


def test_generate_on_4096_tokens() -> None:
    """The long-input case of the T5 family: a row padded after 3000 of 4096 tokens generates and encodes what
    the row alone does."""
    model = lsg_patch.to_lsg(build("t5", "ForConditionalGeneration"), max_length=4096, block_size=128,
                             sparsity_type="norm", num_global_tokens=4)
    ids = torch.randint(5, 99, (2, 4096), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 3000:] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    alone = model.generate(ids[1:, :3000], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 5) and torch.equal(out[1], alone[0])
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        encoded_alone = model.get_encoder()(input_ids=ids[1:, :3000]).last_hidden_state
    assert encoded.shape[1] == 4 + 4096
    torch.testing.assert_close(encoded[1, : 4 + 3000], encoded_alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_save_and_reload_under_enabled_is_bit_exact(model_type: str, tmp_path) -> None:  # noqa: ANN001
    model = lsg_patch.to_lsg(build(model_type, "ForConditionalGeneration"), max_length=MAX_LENGTH, **LSG)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).lsg_max_length == MAX_LENGTH
    with lsg_patch.enabled():
        again = type(model).from_pretrained(tmp_path).eval()
    assert lsg_patch.is_lsg_model(again)
    state, loaded = model.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    ids, mask = inputs()
    with torch.no_grad():
        kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5], use_cache=False)
        assert torch.equal(model(**kwargs).logits, again(**kwargs).logits)
    with pytest.raises(ValueError, match=f"at most {MAX_LENGTH}"):
        again(input_ids=torch.zeros(1, MAX_LENGTH + 1, dtype=torch.long), decoder_input_ids=ids[:1, :2])


def test_global_tokens_are_seeded_from_eos_and_pad() -> None:
    """T5 has no bos, cls or mask token and no position vectors: row 0 starts as eos' word vector, the others
    as pad's (without them every global token would be a zero vector)."""
    model = lsg_patch.to_lsg(build("t5", "Model"), max_length=MAX_LENGTH, **LSG)
    table, words = model.encoder.global_embeddings.weight, model.shared.weight
    assert torch.equal(table[0], words[model.config.eos_token_id])
    assert torch.equal(table[1:], words[model.config.pad_token_id].expand(table.shape[0] - 1, -1))


def test_umt5_from_lsg_gives_back_compute_bias() -> None:
    plain = build("umt5", "Model")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LSG)
    attention = model.encoder.block[1].layer[0].SelfAttention
    assert "compute_bias" in attention.__dict__
    lsg_patch.from_lsg(model)
    assert "compute_bias" not in attention.__dict__
    ids, mask = inputs()
    with torch.no_grad():
        kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])
        assert torch.equal(model(**kwargs).last_hidden_state, plain(**kwargs).last_hidden_state)
