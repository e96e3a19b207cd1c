"""Training a patched model: gradients of the LSG product against the dense oracle, loss going down
with dropout, gradient checkpointing and bf16 autocast, and training the global tokens only."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

import lsg_patch
from lsg_patch.attention import AttentionLayout, lsg_attention, prepare_mask
from tests.oracle import oracle_attention
from tests.tiny_models import tiny_model

DETERMINISTIC_TYPES = ["none", "norm", "pooling", "stride", "block_stride", "bos_pooling"]
LSG = dict(max_length=256, block_size=16, sparse_block_size=16, sparsity_factor=4)


@st.composite
def product_cases(draw: st.DrawFn):
    bs = draw(st.sampled_from([2, 4, 8]))
    layout = AttentionLayout(
        num_global_tokens=draw(st.integers(1, 3)),
        block_size=bs,
        sparse_block_size=draw(st.integers(0, 2 * bs)),
        sparsity_factor=draw(st.sampled_from([f for f in range(1, bs + 1) if bs % f == 0])),
        sparsity_type=draw(st.sampled_from(DETERMINISTIC_TYPES)),
    )
    t = bs * draw(st.integers(1, 6))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n, h, d = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    qkv = torch.randn(3, n, h, layout.num_global_tokens + t, d, generator=generator, dtype=torch.float64)
    token_mask = torch.rand(n, t, generator=generator) < 0.8
    token_mask[:, 0] = True
    upstream = torch.randn(n, h, layout.num_global_tokens + t, d, generator=generator, dtype=torch.float64)
    return layout, qkv, token_mask, upstream


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the oracle's norm ranking
@settings(max_examples=60, deadline=None)
@given(product_cases())
def test_product_gradients_match_the_dense_oracle(case):
    layout, qkv, token_mask, upstream = case
    grads = []
    for attention in (
        lambda q, k, v: lsg_attention(q, k, v, prepare_mask(token_mask, layout), layout),
        lambda q, k, v: oracle_attention(q, k, v, token_mask, layout),
    ):
        inputs = [x.clone().requires_grad_() for x in qkv]
        grads.append(torch.autograd.grad((attention(*inputs) * upstream).sum(), inputs))
    for ours, oracle in zip(*grads):
        torch.testing.assert_close(ours, oracle, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sparsity_type", ["norm", "pooling", "bos_pooling", "stride", "block_stride"])
def test_product_gradcheck(sparsity_type):
    layout = AttentionLayout(num_global_tokens=2, block_size=4, sparse_block_size=4, sparsity_factor=2,
                             sparsity_type=sparsity_type)
    generator = torch.Generator().manual_seed(0)
    token_mask = torch.ones(1, 16, dtype=torch.bool)
    token_mask[0, 13:] = False
    mask = prepare_mask(token_mask, layout)
    inputs = [torch.randn(1, 2, 18, 3, generator=generator, dtype=torch.float64, requires_grad=True)
              for _ in range(3)]
    assert torch.autograd.gradcheck(lambda q, k, v: lsg_attention(q, k, v, mask, layout), inputs, fast_mode=True)


def classifier(dropout: float = 0.1, **lsg):
    model = tiny_model("bert", AutoModelForSequenceClassification, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout)
    return lsg_patch.to_lsg(model, **{**LSG, **lsg})


def batch(seed: int = 1, length: int = 90):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 99, (4, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 20 :] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 1, 0]))


def enable_checkpointing(model) -> None:
    # transformers 5.x renamed gradient_checkpointing_enable (kept as a deprecated alias); use what exists
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def eval_loss(model, inputs) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(**inputs).loss.item()
    model.train()
    return loss


@pytest.mark.parametrize("mode", ["dropout", "checkpointing", "bf16"])
def test_loss_falls(mode):
    torch.manual_seed(0)
    model = classifier(sparsity_type="norm")
    if mode == "checkpointing":
        enable_checkpointing(model)
    inputs = batch()
    before = eval_loss(model, inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    attention_dtypes = set()

    def record_dtype(module, args, output) -> None:
        if module.training:
            attention_dtypes.add(output[0].dtype)

    model.bert.encoder.layer[0].attention.self.register_forward_hook(record_dtype)
    model.train()
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = eval_loss(model, inputs)
    assert after < 0.5 * before, (before, after)
    assert attention_dtypes == {torch.bfloat16 if mode == "bf16" else torch.float32}


def test_dropout_is_active_in_training():
    torch.manual_seed(0)
    model = classifier(dropout=0.3, sparsity_type="stride").train()
    inputs = batch()
    first, second = model(**inputs).logits, model(**inputs).logits
    assert not torch.allclose(first, second)
    model.eval()
    assert torch.equal(model(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("sparsity_type", ["norm", "bos_pooling"])
def test_checkpointing_gives_the_same_gradients(sparsity_type):
    grads = []
    for checkpoint in (False, True):
        model = classifier(dropout=0.0, sparsity_type=sparsity_type).train()
        if checkpoint:
            enable_checkpointing(model)
        model(**batch()).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert grads[0]["bert.embeddings.global_embeddings.weight"][:1].abs().sum() > 0


def test_training_only_the_global_tokens():
    """As the LSG model cards suggest: freeze everything but the global embeddings and the head."""
    torch.manual_seed(0)
    model = classifier(dropout=0.0, sparsity_type="norm", num_global_tokens=4)
    trainable = {"bert.embeddings.global_embeddings.weight", "classifier.weight", "classifier.bias"}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    inputs = batch()
    start = eval_loss(model, inputs)
    model.train()
    for _ in range(5):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable
    table = after["bert.embeddings.global_embeddings.weight"]
    original = before["bert.embeddings.global_embeddings.weight"]
    assert not torch.equal(table[:4], original[:4])
    assert torch.equal(table[4:], original[4:])  # rows past num_global_tokens take no gradient
    assert eval_loss(model, inputs) < start
