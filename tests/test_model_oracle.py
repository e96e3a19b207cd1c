"""Model-level oracle: every registered and every inferred model type, on the sparse block path.

Each converted model runs the same padded batch of several blocks twice: once with the attention product
(`lsg_attention`), once with LSG computed from its definition in float64 by tests/oracle.py, substituted at the
one place the seam calls the product (`lsg_patch.seam.interface.lsg_attention`). Everything else (hooks,
embeddings, global tokens, block padding, position tables, T5's relative bias, causal masking, grouped-query
keys, the trimming of the output) is the model's own and the same in both runs, so a wrong sparse selection, a
wrong key position, a wrong bias or a wrong mask in the product shows as a difference. Float64 models: equal to
1e-10; float32 models (the oracle still computes in float64): equal to 1e-6.

The position tables are made shorter than the input (32 rows for 37 tokens), so the tiled or regenerated rows of
the conversion are part of what both runs read.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsg_patch
from lsg_patch.seam import interface
from tests.helpers import definition_attention
from tests.tiny_models import TINY_CONFIGS, build, unregistered_model

MAX_LENGTH, LENGTH, PADDED = 128, 37, 23  # 37 tokens: 5 blocks of 8 after block padding; row 1 has 23 real tokens
TABLE_ROWS = 32  # position rows of the unconverted models: shorter than the input
BLOCK = dict(block_size=8, num_global_tokens=2)
# Every sparsity type, each with its own factor and window (odd steps, windows wider and narrower than a block).
SPARSITY = {
    "norm": dict(sparsity_type="norm", sparsity_factor=2, sparse_block_size=4),
    "pooling": dict(sparsity_type="pooling", sparsity_factor=4, sparse_block_size=6),
    "lsh": dict(sparsity_type="lsh", sparsity_factor=2, sparse_block_size=8, lsh_num_pre_rounds=2),
    "stride": dict(sparsity_type="stride", sparsity_factor=2, sparse_block_size=4),
    "block_stride": dict(sparsity_type="block_stride", sparsity_factor=4, sparse_block_size=5),
    "bos_pooling": dict(sparsity_type="bos_pooling", sparsity_factor=8, sparse_block_size=3),  # step 1: odd
}


# Inferred types: unregistered model types of every layout architecture_inference.py knows that transformers has (a registered
# type renamed gives the same entry and outputs as the registered one: tests/test_inferred_layouts.py).
INFERRED = ["ernie", "gemma", "olmo", "gpt_bigcode", "plbart", "marian", "switch_transformers"]


def registered_model(model_type: str) -> torch.nn.Module:
    """The tiny model of a registered type with a position table shorter than the input; BERT as a decoder."""
    head = "Model"
    if model_type == "bert-decoder":
        model_type, head = "bert", "LMHeadModel"
    offset = TINY_CONFIGS[model_type].get("max_position_embeddings", 64) - 64  # RoBERTa-likes count 2 rows more
    return build(model_type, head, max_position_embeddings=TABLE_ROWS + offset)


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    **{t: (lambda t=t: registered_model(t)) for t in (*TINY_CONFIGS, "bert-decoder")},
    **{t: (lambda t=t: unregistered_model(t, max_position_embeddings=TABLE_ROWS)) for t in INFERRED},
}


def inputs_for(model: torch.nn.Module, seed: int = 1, length: int = LENGTH, padded: int = PADDED
               ) -> dict[str, torch.Tensor]:
    """A batch of 2 (row 1 padded after `padded` tokens); encoder-decoders also get 5 decoder tokens."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, padded:] = 0
    ids[1, padded:] = config.pad_token_id if config.pad_token_id is not None else 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(5, 99, (2, 5), generator=generator)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False  # the cache is tested in test_cache.py
    return inputs


def both_outputs(model: torch.nn.Module, inputs: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every tensor output of the model run with the product, and run with the oracle at the seam."""
    calls = []

    def counted(*args, **kwargs) -> torch.Tensor:
        calls.append(args[3].index is not None)  # True: the block path (the mask has a side-key index)
        return definition_attention(*args, **kwargs)

    with torch.no_grad():
        product = model(**inputs)
        with mock.patch.object(interface, "lsg_attention", counted):
            oracle = model(**inputs)
    assert calls and all(calls), "the oracle was not called on the block path"
    tensors = lambda out: {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}  # noqa: E731
    return tensors(product), tensors(oracle)


def assert_outputs_match(model: torch.nn.Module, inputs: dict, atol: float) -> None:
    product, oracle = both_outputs(model, inputs)
    assert product.keys() == oracle.keys() and product
    for name, value in product.items():
        torch.testing.assert_close(value, oracle[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def converted(model_type: str, dtype: torch.dtype = torch.float64, **lsg) -> torch.nn.Module:
    model = MODELS[model_type]().to(dtype)
    return lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **{**BLOCK, **lsg})


def test_every_registered_and_inferred_layout_is_covered() -> None:
    registered = set(lsg_patch.supported_architectures())
    assert registered <= set(MODELS), f"registered types without an oracle case: {registered - set(MODELS)}"
    for model_type in INFERRED:
        assert model_type not in registered
        assert lsg_patch.architecture_support(MODELS[model_type]()).startswith("inferred")


def grid() -> list[tuple[str, str]]:
    """(model type, sparsity type): every sparsity type for the first type of each registry entry, for BERT as a
    decoder and for every inferred type; two (in turn) for a type that shares an entry with an earlier one."""
    entries, pairs = lsg_patch.supported_architectures(), []
    seen: set[int] = set()
    for index, model_type in enumerate(MODELS):
        entry = entries.get(model_type)
        shared = entry is not None and id(entry) in seen
        seen.add(id(entry))
        kinds = sorted(SPARSITY)
        pairs += [(model_type, kind) for kind in (kinds[index % 6 : index % 6 + 2] if shared else kinds)]
    return pairs


@pytest.mark.parametrize(("model_type", "sparsity"), grid())
def test_model_matches_the_oracle_in_float64(model_type: str, sparsity: str) -> None:
    model = converted(model_type, **SPARSITY[sparsity])
    assert_outputs_match(model, inputs_for(model), atol=1e-10)


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_model_matches_the_oracle_in_float32(model_type: str) -> None:
    """pooling and mask_first_token, float32 models: every LSG layer's product output is within 1e-6 of the
    float64 oracle on that layer's own inputs, and the model's outputs within 1e-5 of the oracle run's."""
    model = converted(model_type, torch.float32, mask_first_token=True, **SPARSITY["pooling"])
    product, differences = interface.lsg_attention, []

    def compared(*args, **kwargs) -> torch.Tensor:
        got = product(*args, **kwargs)
        query, key, value, *rest = (x.double() if isinstance(x, torch.Tensor) else x for x in args)
        want = definition_attention(query, key, value, *rest, **kwargs)
        differences.append((got.double() - want).abs().max().item())
        return got

    inputs = inputs_for(model)
    with torch.no_grad(), mock.patch.object(interface, "lsg_attention", compared):
        model(**inputs)
    assert differences and max(differences) < 1e-6, differences
    assert_outputs_match(model, inputs, atol=1e-5)


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    block = draw(st.sampled_from([4, 8]))
    return dict(sparsity_type=draw(st.sampled_from(sorted(SPARSITY))), block_size=block,
                sparsity_factor=draw(st.sampled_from([f for f in (1, 2, 4, 8) if block % f == 0])),
                sparse_block_size=draw(st.integers(1, 2 * block)), num_global_tokens=draw(st.integers(1, 3)),
                mask_first_token=draw(st.booleans()))


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(model_type=st.sampled_from(["bert", "t5", "llama", "bart", "gpt2", "modernbert", "bert-decoder"]),
       lsg=layouts(), length=st.integers(17, 40), padded=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_random_layouts_match_the_oracle(model_type: str, lsg: dict, length: int, padded: int, seed: int) -> None:
    """Block sizes, factors (1 included: raw tokens), windows, global counts, lengths and padding drawn at random."""
    model = converted(model_type, **lsg)
    if length <= 2 * lsg["block_size"]:
        length = 2 * lsg["block_size"] + 1
    assert_outputs_match(model, inputs_for(model, seed, length, min(padded, length)), atol=1e-10)


def test_a_wrong_product_is_caught() -> None:
    """The comparison can fail: an attention that ignores the sparse keys differs from the oracle (norm, BERT)."""
    model = converted("bert", **SPARSITY["norm"])
    inputs = inputs_for(model)
    without_sparse = lambda q, k, v, mask, layout, **kw: definition_attention(  # noqa: E731
        q, k, v, mask, dataclasses.replace(layout, sparsity_type="none"), **kw)
    with torch.no_grad(), mock.patch.object(interface, "lsg_attention", without_sparse):
        wrong = model(**inputs).last_hidden_state
    product, _ = both_outputs(model, inputs)
    assert (product["last_hidden_state"] - wrong).abs().max() > 1e-3
    assert not math.isnan(float(wrong.sum()))
