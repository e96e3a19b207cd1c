"""One converted model serves several threads at once: every output bit-equal to the serial one.

Per-call LSG state travels with the call (`lsg_call`), so concurrent forwards of different lengths and padding
cannot see each other's masks. Checked for each family: BERT-like, BART-like, ALBERT, DistilBERT.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lsg_patch
from tests.helpers import LSG, MAX_LENGTH
from tests.tiny_models import build

CALLS, THREADS = 60, 3


def _inputs(model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Call `index`: its own length (short and long, on and off the block grid) and padding."""
    generator = torch.Generator().manual_seed(index)
    length = 5 + (index * 37) % (MAX_LENGTH - 5)
    ids = torch.randint(5, 99, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, max(1, length - 1 - index % 23):] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(5, 99, (2, 3 + index % 5), generator=generator)
    return inputs


@pytest.mark.parametrize("model_type", ["bert", "bart", "albert", "distilbert"])
def test_concurrent_calls_equal_serial_calls(model_type: str) -> None:
    model = lsg_patch.to_lsg(build(model_type, "Model"), max_length=MAX_LENGTH, **LSG)
    inputs = [_inputs(model, index) for index in range(CALLS)]

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).last_hidden_state

    serial = [run(batch) for batch in inputs]
    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(run, inputs))
    assert all(torch.equal(a, b) for a, b in zip(serial, concurrent))
