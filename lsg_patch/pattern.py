"""The LSG attention pattern: which keys every query may attend to, from the LSG parameters alone.

`attention_pattern` gives a (G + t, G + t) matrix of key kinds (rows: queries, columns: keys, global
tokens first, as inside the encoder); `plot_pattern` draws it like the figure of the LSG paper. For the
position-based sparse types (stride, block_stride, sparsity_factor 1) the sparse keys are exact. The
other types (norm, pooling, bos_pooling, lsh) compute their sparse keys from the data, so the pattern
shows the tokens each sparse window is computed from (`SPARSE_REGION`), not the exact keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention.layout import AttentionLayout
from .attention.masks import sparse_windows
from .attention.sparse import POSITION_KINDS, chunk_size, sparse_kind, sparse_token_positions
from .config import LSGConfig, has_lsg_settings
from .families.base import block_padding

# Key kinds, in the order later ones are drawn over earlier ones (a key in several sets shows the last).
NOT_ATTENDED, SPARSE_REGION, SPARSE, LOCAL, FULL, GLOBAL = range(6)

_COLOURS = {
    SPARSE_REGION: "#f6c28b",
    SPARSE: "#e8772e",
    LOCAL: "#3a7dc9",
    FULL: "#8fb8e8",
    GLOBAL: "#2e9e5b",
}


def attention_pattern(config_or_model: Any, length: int, head: int = 0) -> torch.Tensor:
    """(G + length, G + length) uint8 key kinds (the module constants) of one head of an LSG encoder.

    config_or_model: an LSGConfig, a transformers config with LSG settings, or a model patched by to_lsg.
    Adaptive padding is applied as the model does and then cropped: padded keys are never attended.
    """
    lsg = _lsg_settings(config_or_model)
    _check_arguments(config_or_model, length, head)
    layout = lsg.layout
    g, t = layout.num_global_tokens, length + block_padding(length, lsg)
    pattern = torch.full((g + t, g + t), NOT_ATTENDED, dtype=torch.uint8)
    if layout.uses_full_attention(t):
        pattern[:] = FULL
    else:
        pattern[g:, g:] = _token_block_pattern(layout, t, head).repeat_interleave(layout.block_size, dim=0)
    pattern[:g, :] = GLOBAL
    pattern[:, :g] = GLOBAL
    if lsg.mask_first_token:
        pattern[:, g] = NOT_ATTENDED
    return pattern[: g + length, : g + length]


def plot_pattern(config_or_model: Any, length: int, path: str | Path, *, head: int = 0, dpi: int = 150) -> Path:
    """Draw `attention_pattern(config_or_model, length, head)` into a PNG at `path` and return the path.

    Needs matplotlib (`pip install lsg_patch[plot]`); it is imported only when a picture is drawn.
    """
    path = Path(path)
    pattern_figure(config_or_model, length, head=head).savefig(path, dpi=dpi)
    return path


def pattern_figure(config_or_model: Any, length: int, *, head: int = 0) -> Any:
    """The matplotlib Figure `plot_pattern` saves (no pyplot state is touched; display it in a notebook)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        raise ImportError(
            "plot_pattern needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib` (or `pip install lsg_patch[plot]`)"
        ) from None
    lsg = _lsg_settings(config_or_model)
    pattern = attention_pattern(config_or_model, length, head)
    colours = ["white"] + [_COLOURS[kind] for kind in range(1, GLOBAL + 1)]
    figure = Figure(figsize=(7.5, 6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(pattern.numpy(), cmap=ListedColormap(colours), vmin=0, vmax=GLOBAL, interpolation="nearest")
    size, g = pattern.shape[0], lsg.num_global_tokens
    for width, height in ((size, g), (g, size)):  # outlined so that one global row stays visible at any length
        colour = _COLOURS[GLOBAL]
        axes.add_patch(Rectangle((-0.5, -0.5), width, height, facecolor=colour, edgecolor=colour, linewidth=2.5))
    axes.set_xlabel("key position (global tokens first)")
    axes.set_ylabel("query position (global tokens first)")
    axes.set_title(
        f"LSG attention, {length} tokens, head {head}\nblock_size={lsg.block_size}, sparsity_type="
        f"{lsg.sparsity_type}, sparse_block_size={lsg.sparse_block_size}, sparsity_factor={lsg.sparsity_factor}, "
        f"globals={lsg.num_global_tokens}",
        fontsize=9,
    )
    present = set(pattern.unique().tolist())
    handles = [Patch(color=_COLOURS[kind], label=_legend(kind, lsg)) for kind in sorted(present - {NOT_ATTENDED})]
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, ncol=2, frameon=False)
    figure.tight_layout()
    return figure


def _token_block_pattern(layout: AttentionLayout, num_tokens: int, head: int) -> torch.Tensor:
    """(B, T) key kinds over the tokens for each token query block (docs/LSG_SPEC.md sections 6 and 7)."""
    bs, num_blocks = layout.block_size, num_tokens // layout.block_size
    blocks = torch.full((num_blocks, num_tokens), NOT_ATTENDED, dtype=torch.uint8)
    kind = sparse_kind(layout)
    if kind != "none":
        tokens, exists, marker = _sparse_tokens(layout, kind, num_tokens, num_blocks, head)
        rows = torch.arange(num_blocks)[:, None].expand_as(tokens)
        blocks[rows[exists], tokens[exists]] = marker
    local = (torch.arange(num_blocks)[:, None] - 1) * bs + torch.arange(3 * bs)
    rows = torch.arange(num_blocks)[:, None].expand_as(local)
    inside = (local >= 0) & (local < num_tokens)
    blocks[rows[inside], local[inside]] = LOCAL
    return blocks


def _sparse_tokens(
    layout: AttentionLayout, kind: str, num_tokens: int, num_blocks: int, head: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token positions (B, K) behind each block's sparse windows, which of them exist, and their kind."""
    before, after = sparse_windows(layout, num_blocks)
    items = torch.cat([before, after], dim=1)
    count = num_tokens // layout.sparsity_factor
    exists = (items >= 0) & (items < count)
    items = items.clamp(0, count - 1)
    if kind in POSITION_KINDS:
        positions = sparse_token_positions(layout, num_tokens)
        return positions[head % positions.shape[0]][items], exists, SPARSE
    if kind in {"pooling", "bos_pooling"}:  # item j pools tokens j*sf .. j*sf + sf - 1
        width = layout.sparsity_factor
        start = items * width
    else:  # norm, lsh: item j is chosen/hashed from the c tokens of chunk j // (c / sf)
        width = chunk_size(layout)
        start = items // (width // layout.sparsity_factor) * width
    tokens = (start[..., None] + torch.arange(width)).flatten(1)
    return tokens, exists.repeat_interleave(width, dim=1), SPARSE_REGION


def _legend(kind: int, lsg: LSGConfig) -> str:
    if kind == SPARSE_REGION:
        return f"sparse ({lsg.sparsity_type}): tokens the sparse keys are computed from (data-dependent)"
    if kind == SPARSE:
        return f"sparse ({sparse_kind(lsg.layout)}): exact sparse keys"
    return {
        LOCAL: "local: previous, same and next block",
        FULL: "full attention (input of at most 2 blocks)",
        GLOBAL: f"global tokens ({lsg.num_global_tokens})",
    }[kind]


def _lsg_settings(config_or_model: Any) -> LSGConfig:
    """The LSGConfig of an LSGConfig, an LSG transformers config, or a patched model."""
    if isinstance(config_or_model, LSGConfig):
        return config_or_model
    config = config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model
    if config is None or not has_lsg_settings(config):
        raise ValueError(
            f"cannot read LSG settings from a {type(config_or_model).__name__}: give an lsg_patch.LSGConfig, a "
            "transformers config with LSG settings, or a model converted with lsg_patch.to_lsg"
        )
    return LSGConfig.from_model_config(config)


def _check_arguments(config_or_model: Any, length: Any, head: Any) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length={length!r} is not accepted: it must be a positive integer (the token count)")
    if isinstance(head, bool) or not isinstance(head, int) or head < 0:
        raise ValueError(f"head={head!r} is not accepted: it must be a head index >= 0")
    record = getattr(getattr(config_or_model, "base_model", None), "_lsg_patch", None)
    if record is not None and length > record.max_length:
        raise ValueError(
            f"length={length} is more than this model accepts (max_length={record.max_length}); "
            f"give a length of at most {record.max_length}"
        )
    heads = getattr(getattr(config_or_model, "config", config_or_model), "num_attention_heads", None)
    if isinstance(heads, int) and head >= heads:
        raise ValueError(f"head={head} is not accepted: the model has {heads} heads, give 0 .. {heads - 1}")
