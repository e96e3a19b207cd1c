"""The fused Triton kernels (`attention/triton_kernels.py`) run by Triton's interpreter on CPU tensors.

Run with TRITON_INTERPRET=1 in the environment (skipped otherwise; CI has a step for it): the same kernel code a
GPU compiles then runs here, slowly, so every case is tiny.
Outputs and q/k/v gradients (and a T5 bias table's) against the float64 oracle (tests/oracle.py); dropout against
the CPU blocked kernel with the same seed, whose keep-mask test_dropout.py checks against its own oracle.
"""
from __future__ import annotations

import os
from functools import partial
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsg_patch.attention import AttentionLayout, RelativeBias, lsg_attention, prepare_mask, product
from lsg_patch.attention.backends import BACKEND_VARIABLE, INTERPRETER_VARIABLE
from tests.oracle import oracle_attention

if os.environ.get(INTERPRETER_VARIABLE) != "1":  # a couple of minutes: CI runs it in a step of its own
    pytest.skip(f"the Triton kernels run on the CPU under {INTERPRETER_VARIABLE}=1 only: "
                f"{INTERPRETER_VARIABLE}=1 python -m pytest tests/test_triton.py", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (the test extra installs it on Linux)")
from lsg_patch.attention import triton_kernels  # noqa: E402 - after the checks: importing it imports triton

TYPES = ["none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh"]
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the oracle's norm ranking


def _backend(name: str) -> mock._patch_dict:
    return mock.patch.dict(os.environ, {BACKEND_VARIABLE: name})


@st.composite
def cases(draw: st.DrawFn, types: list[str] = TYPES) -> dict:
    """A tiny layout of 3-4 blocks, padding, causal or not, grouped-query keys, float64 inputs."""
    bs = draw(st.sampled_from([4, 6, 8]))
    kind = draw(st.sampled_from(types))
    sf = draw(st.sampled_from([f for f in range(1, bs + 1) if bs % f == 0]))
    layout = AttentionLayout(num_global_tokens=draw(st.integers(1, 2)), block_size=bs,
                             sparse_block_size=draw(st.integers(1, bs)), sparsity_factor=sf, sparsity_type=kind)
    t = bs * draw(st.integers(3, 4))
    n, key_heads, d = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([4, 8, 16]))
    group = draw(st.integers(1, 2))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    g = layout.num_global_tokens
    query = torch.randn(n, key_heads * group, g + t, d, generator=generator, dtype=torch.float64)
    key, value = torch.randn(2, n, key_heads, g + t, d, generator=generator, dtype=torch.float64)
    token_mask = torch.ones(n, t, dtype=torch.bool)
    if draw(st.booleans()):
        token_mask = torch.arange(t) < torch.randint(1, t + 1, (n, 1), generator=generator)
    upstream = torch.randn(query.shape, generator=generator, dtype=torch.float64)
    return dict(layout=layout, qkv=(query, key, value), token_mask=token_mask, upstream=upstream,
                causal=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.7])))


def _outputs_and_gradients(case: dict, attention, dtype: torch.dtype = torch.float64, bias_table=None  # noqa: ANN001
                           ) -> tuple[torch.Tensor, ...]:
    """attention(q, k, v, table) and the gradients of (out * upstream).sum() for q, k, v (and the table)."""
    inputs = [x.to(dtype).requires_grad_() for x in case["qkv"]]
    table = [] if bias_table is None else [bias_table.clone().requires_grad_()]
    out = attention(*inputs, *table)
    grads = torch.autograd.grad((out.double() * case["upstream"]).sum(), inputs + table)
    return (out, *grads)


def _lsg(case: dict, backend: str = "triton", dropout_p: float = 0.0, bias_of=None):  # noqa: ANN001, ANN202
    layout, mask = case["layout"], prepare_mask(case["token_mask"], case["layout"])

    def attention(query, key, value, *table):  # noqa: ANN001, ANN202
        bias = None if bias_of is None else bias_of(*table)
        with _backend(backend):
            return lsg_attention(query, key, value, mask, layout, causal=case["causal"], scale=case["scale"],
                                 dropout_p=dropout_p, bias=bias)
    return attention


def _oracle(case: dict, bias_of=None):  # noqa: ANN001, ANN202
    """The oracle over keys repeated to the query heads (it knows no grouped keys), in float64."""
    def attention(query, key, value, *table):  # noqa: ANN001, ANN202
        group = query.shape[1] // key.shape[1]
        key, value = (x.double().repeat_interleave(group, dim=1) for x in (key, value))
        return oracle_attention(query.double(), key, value, case["token_mask"], case["layout"],
                                causal=case["causal"], scale=case["scale"],
                                bias=None if bias_of is None else bias_of(*table))
    return attention


def _assert_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], tolerance: float) -> None:
    for name, g, w in zip(("output", "query", "key", "value", "table"), got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=tolerance, atol=tolerance,
                                   msg=lambda m, name=name: f"{name}: {m}")


@settings(max_examples=10, deadline=None)
@given(cases())
def test_outputs_and_gradients_match_the_oracle(case: dict) -> None:
    """Every sparsity type (item gradients flowing back through sparse_items), padding, causal, grouped keys."""
    _assert_close(_outputs_and_gradients(case, _lsg(case)), _outputs_and_gradients(case, _oracle(case)), 1e-10)


def _t5_bias_of(heads: int, num_buckets: int, max_distance: int):  # noqa: ANN202
    from transformers.models.t5.modeling_t5 import T5Attention
    bucket = partial(T5Attention._relative_position_bucket, bidirectional=True, num_buckets=num_buckets,
                     max_distance=max_distance)
    return (lambda table: RelativeBias(table, bucket),
            lambda table: lambda head, distance: table[int(bucket(torch.tensor(distance))), head])


@pytest.mark.parametrize("buckets", [(4, 3), (32, 128)])
@settings(max_examples=3, deadline=None)
@given(case=cases(), seed=st.integers(0, 2**31))
def test_t5_bias_and_its_table_gradient_match_the_oracle(case: dict, buckets: tuple[int, int], seed: int) -> None:
    """T5's bias and its table's gradient: 4 buckets up to distance 3 give one side value per head and direction
    (scores shared by a block's rows, summed in the kernel; odd sparse steps excepted), 32 up to 128 one per key."""
    heads = case["qkv"][0].shape[1]
    table = torch.randn(buckets[0], heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours, oracles = _t5_bias_of(heads, *buckets)
    got = _outputs_and_gradients(case, _lsg(case, bias_of=ours), bias_table=table)
    _assert_close(got, _outputs_and_gradients(case, _oracle(case, bias_of=oracles), bias_table=table), 1e-10)


@settings(max_examples=5, deadline=None)
@given(cases(), st.integers(0, 2**32 - 1), st.sampled_from([0.1, 0.5]))
def test_dropout_keeps_what_the_cpu_blocked_kernel_keeps(case: dict, seed: int, p: float) -> None:
    """The same seed gives the same kept scores as the CPU blocked kernel (output and gradients), regenerated in
    the backward; and dropout changes the output."""
    with mock.patch.object(product, "draw_seed", lambda: seed):
        got = _outputs_and_gradients(case, _lsg(case, dropout_p=p))
        want = _outputs_and_gradients(case, _lsg(case, backend="auto", dropout_p=p))
    _assert_close(got, want, 1e-10)
    assert not torch.allclose(got[0], _outputs_and_gradients(case, _lsg(case))[0])


def _case(bs: int, t: int, kind: str, causal: bool, g: int, heads: int = 2, d: int = 16) -> dict:
    """One fixed case; the last half block padded when there are global tokens (without them a padded row
    would have no key left, which the oracle leaves undefined)."""
    layout = AttentionLayout(num_global_tokens=g, block_size=bs, sparse_block_size=bs // 2, sparsity_factor=2,
                             sparsity_type=kind)
    generator = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(1, heads, g + t, d, generator=generator, dtype=torch.float64) for _ in range(3))
    token_mask = torch.arange(t)[None] < (t - bs // 2 if g else t)
    upstream = torch.randn(qkv[0].shape, generator=generator, dtype=torch.float64)
    return dict(layout=layout, qkv=qkv, token_mask=token_mask, upstream=upstream, causal=causal, scale=None)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float16, 2e-2),
                                                  (torch.bfloat16, 1e-1)])
def test_half_and_single_precision_match_the_oracle(dtype: torch.dtype, tolerance: float) -> None:
    """Inputs of each training dtype (scores and accumulators in float32) against the float64 oracle."""
    case = _case(8, 32, "pooling", causal=False, g=1)
    got = _outputs_and_gradients(case, _lsg(case), dtype=dtype)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1:])
    _assert_close(got, _outputs_and_gradients(case, _oracle(case)), tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_dropout_keeps_what_the_blocked_kernel_keeps(dtype: torch.dtype, tolerance: float) -> None:
    """fp16/bf16 with dropout (causal, grouped keys) against the blocked kernel in float64 with the same seed."""
    case = _case(8, 32, "norm", causal=True, g=1)
    case["qkv"] = (case["qkv"][0], *(x[:, :1] for x in case["qkv"][1:]))  # 2 query heads share 1 key head
    with mock.patch.object(product, "draw_seed", lambda: 1234):
        got = _outputs_and_gradients(case, _lsg(case, dropout_p=0.3), dtype=dtype)
        want = _outputs_and_gradients(case, _lsg(case, backend="auto", dropout_p=0.3))
    _assert_close(got, want, tolerance)


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_larger_than_a_program_are_split_into_tiles(causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 24 rows over programs of 16 (two tiles, the second half full), windows over two column steps."""
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK_M", 16)
    monkeypatch.setattr(triton_kernels, "BLOCK_N", 16)
    case = _case(24, 72, "norm", causal=causal, g=2, heads=1, d=4)
    _assert_close(_outputs_and_gradients(case, _lsg(case)), _outputs_and_gradients(case, _oracle(case)), 1e-10)


def test_a_layout_without_global_tokens() -> None:
    """No global rows: the kernels run the token blocks alone."""
    case = _case(4, 16, "stride", causal=False, g=0)
    _assert_close(_outputs_and_gradients(case, _lsg(case)), _outputs_and_gradients(case, _oracle(case)), 1e-10)


def test_the_triton_backend_runs_the_triton_kernel_on_the_block_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block path runs TritonAttention (read off grad_fn) and no CPU-only op; inputs of at most two blocks
    stay on SDPA."""
    monkeypatch.setattr(product, "_flash", None)  # the CPU flash kernel: calling it would raise
    for t, function in ((32, "TritonAttentionBackward"), (16, "ScaledDotProduct")):
        case = _case(8, t, "norm", causal=False, g=1)
        out = _lsg(case)(*(x.clone().requires_grad_() for x in case["qkv"]))
        assert type(out.grad_fn).__name__.startswith(function), out.grad_fn
