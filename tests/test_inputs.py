"""Inputs an LSG model refuses instead of misreading: empty inputs, 4-D masks outside transformers' convention."""
from __future__ import annotations

import pytest
import torch

import lsg_patch
from tests.helpers import LSG, MAX_LENGTH
from tests.tiny_models import build

LENGTH = 40


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG)


def test_empty_input_is_refused(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="0 tokens"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long))


def _four_d(mask_2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, T, T): transformers' 4-D layout; bool = True attends, float = additive."""
    allowed = mask_2d.bool()[:, None, None, :].expand(-1, 1, mask_2d.shape[1], -1)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_four_d_masks_in_transformers_convention_match_the_2d_mask(model: torch.nn.Module, dtype: torch.dtype) -> None:
    ids = torch.randint(5, 99, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, 27:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=_four_d(mask, dtype)).last_hidden_state
    assert torch.equal(got, expected)


def test_integer_and_biased_four_d_masks_are_refused(model: torch.nn.Module) -> None:
    ids = torch.randint(5, 99, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    ones = torch.ones(1, LENGTH, dtype=torch.long)
    with pytest.raises(ValueError, match="dtype torch.int64 is not accepted"):
        model(input_ids=ids, attention_mask=_four_d(ones, torch.bool).long())
    biased = _four_d(ones, torch.float32) - 0.5
    with pytest.raises(ValueError, match="not other biases"):
        model(input_ids=ids, attention_mask=biased)
