"""torch.compile on a patched model: same outputs as eager, and no recompilation for every new input
length that pads to the same block count (compilation is slow on CPU, so the models have one layer)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import lsg_patch
from tests.tiny_models import tiny_model

LSG = dict(max_length=256, block_size=16, sparse_block_size=16, sparsity_factor=4, sparsity_type="norm")


@pytest.fixture
def model():
    torch._dynamo.reset()
    yield lsg_patch.to_lsg(tiny_model("bert", num_hidden_layers=1), **LSG)
    torch._dynamo.reset()


def outputs(model, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 99, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length // 2 :] = 0
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.mark.slow
def test_compiled_model_matches_eager(model):
    """The default backend (inductor), on the LSG path with adaptive padding (100 tokens -> 7 blocks)."""
    compiled = torch.compile(model)
    torch.testing.assert_close(outputs(compiled, 100), outputs(model, 100), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_lengths_of_one_block_count_do_not_recompile_each_time(model):
    """Lengths 97..111 all pad to 7 blocks of 16. Dynamo compiles each frame for the first length statically and
    for the second with a dynamic length; every other length of those 7 blocks, a padding of exactly 1 token (111)
    included, reuses the dynamic graphs. The frames: the base model's forward, and its own pre-hook (the caller's
    mask) and post-hook (hidden-state rows), which torch.compile(module) runs outside the forward's frame (hooks of
    inner modules are traced inside it). Counted with aot_eager, which traces the same graphs as inductor without
    its C++ compilation."""
    frames = 3
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for length in (97, 98):
        torch.testing.assert_close(outputs(compiled, length), outputs(model, length), rtol=0, atol=1e-4)
    warm = counter.frame_count
    assert warm <= 2 * frames, warm
    for length in (111, 99, 101, 104, 106, 110):
        torch.testing.assert_close(outputs(compiled, length, seed=length), outputs(model, length, seed=length),
                                   rtol=0, atol=1e-4)
    assert counter.frame_count == warm, f"{counter.frame_count - warm} recompilations after warm-up"
