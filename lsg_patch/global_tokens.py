"""Initial values of the 512-row global token table, as the reference converter computes them.

Global tokens start as a spread of the model's own position vectors (every `stride`-th position
first) plus the word vector of the BOS/CLS token (row 0) or of the mask token (other rows), so
that a converted model behaves sensibly before any fine-tuning (docs/LSG_SPEC.md section 9).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GLOBAL_TABLE_ROWS = 512


@dataclass(frozen=True)
class GlobalInit:
    """The inputs of the global-table initialisation that do not come from the model's weights."""

    bos_token_id: int | None
    mask_token_id: int | None
    global_positional_stride: int = 64
    random_global_init: bool = False
    seed: int = 0


def check_seed(seed: object) -> None:
    """The seed goes to torch.Generator.manual_seed: refuse what it would reject with a raw torch error."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} is not accepted: it must be an integer between 0 and 2**64 - 1")


def check_positional_stride(stride: int, positions: int) -> None:
    """Refuse strides the reordering cannot use (it needs 512 / (stride / factor) to be whole)."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"global_positional_stride={stride!r} is not accepted: it must be a positive integer")
    step = _reorder_step(stride, positions)
    if GLOBAL_TABLE_ROWS % step != 0:
        raise ValueError(
            f"global_positional_stride={stride} is not accepted for a table of {positions} positions: "
            f"stride / {max(positions // GLOBAL_TABLE_ROWS, 1)} must divide 512 (for example 16, 32, 64 or 128)"
        )


def initial_global_table(
    positions: torch.Tensor,
    word_embeddings: torch.Tensor,
    token_type_row: torch.Tensor | None,
    init: GlobalInit,
) -> torch.Tensor:
    """The 512 x dim global table. `positions` is the original table without its offset rows."""
    generator = torch.Generator().manual_seed(init.seed)
    table = _spread_positions(positions.detach().float(), init.global_positional_stride, generator)
    words = word_embeddings.detach().float()
    if init.random_global_init:
        words_part = _random_rows(words, generator)
        if init.bos_token_id is not None:
            words_part[0] = words[init.bos_token_id]
            if token_type_row is not None:
                # The reference adds token_type[0] to row 0 a second time on this path; kept for parity.
                words_part[0] = words_part[0] + token_type_row.detach().float()
        table = table + words_part
    else:
        if init.bos_token_id is not None:
            table[0] = table[0] + words[init.bos_token_id]
        if init.mask_token_id is not None:
            table[1:] = table[1:] + words[init.mask_token_id]
    if token_type_row is not None:
        table = table + token_type_row.detach().float()
    return table.to(word_embeddings.dtype)


def _reorder_step(stride: int, positions: int) -> int:
    factor = max(positions // GLOBAL_TABLE_ROWS, 1)
    return max(stride // factor, 1)


def _spread_positions(positions: torch.Tensor, stride: int, generator: torch.Generator) -> torch.Tensor:
    rows = positions.shape[0]
    if rows < GLOBAL_TABLE_ROWS:
        positions = torch.cat([positions, _column_normal_rows(positions, GLOBAL_TABLE_ROWS - rows, generator)])
    elif rows % GLOBAL_TABLE_ROWS != 0:
        positions = positions[: GLOBAL_TABLE_ROWS * (rows // GLOBAL_TABLE_ROWS)]
    factor = positions.shape[0] // GLOBAL_TABLE_ROWS
    sampled = positions[::factor][:GLOBAL_TABLE_ROWS]
    step = _reorder_step(stride, rows)
    per_round = GLOBAL_TABLE_ROWS // step
    g = torch.arange(GLOBAL_TABLE_ROWS)
    return sampled[(g % per_round) * step + g // per_round].clone()


def _column_normal_rows(table: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    mean, std = table.mean(dim=0), table.std(dim=0)
    return mean + std * torch.randn(count, table.shape[1], generator=generator)


def _random_rows(words: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """512 draws from a normal distribution fitted to the word embeddings (full covariance)."""
    mean = words.mean(dim=0)
    centered = words - mean
    covariance = centered.T @ centered / max(words.shape[0] - 1, 1)
    jitter = 1e-5 * covariance.diagonal().mean().clamp_min(1e-12)
    factor = torch.linalg.cholesky(covariance + jitter * torch.eye(words.shape[1]))
    noise = torch.randn(GLOBAL_TABLE_ROWS, words.shape[1], generator=generator)
    return mean + noise @ factor.T
