"""Everything mask-related of LSG attention, computed once per forward pass and shared by all layers.

The key set of token query block i (docs/LSG_SPEC.md section 6) is laid out as
    [G globals | "before" window (sbs items) | tokens (i-1)*bs .. (i+2)*bs (3*bs) | "after" window (sbs items)]
(the sparse windows only if the layout has sparse keys). Order does not change a softmax; this one makes the
causal key set a prefix (globals, before window, previous and current block).

The attention product splits that key set in two: the local window (3 blocks of tokens, a strided view of the
keys, never gathered) and the "side" keys (globals and sparse windows, gathered per layer). Side keys are
addressed in a per-layer source sequence: for item types (norm, pooling, bos_pooling, lsh) the G globals
followed by the S sparse items; otherwise the G + T keys of the layer (position types, sparsity_factor 1,
stride, block_stride, address tokens directly). Positions outside the sequence point at source 0 and are masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import exporting
from .layout import AttentionLayout
from .sparse import ITEM_KINDS, POSITION_KINDS, group_mask, sparse_kind, sparse_step, sparse_token_positions


@dataclass(frozen=True)
class LSGMask:
    """Masks and side-key index of one forward pass (build it with `prepare_mask`).

    tokens: (batch, T) bool, True = the token may be attended.
    full:   (batch, 1, 1, G + T) bool, key mask of the global queries and of the full-attention path.
    index:  (R, B, Ks) long, source position of every side key (globals, sparse windows) of every block; head h
            uses row h % R (R = sparsity_factor for stride/block_stride, else 1). None on the full-attention path.
    blocks: (batch, R, B, Ks) bool, mask of those keys. For norm and lsh, whose item masks depend on the keys,
            it only says which window positions exist; the product adds the item masks per layer.
    local:  (batch, B, 3 * bs) bool, mask of the local window, tokens (i-1)*bs .. (i+2)*bs of block i.
    any_masked: whether any token is masked; when not, the product skips every mask that only padding needs.
    """

    tokens: torch.Tensor
    full: torch.Tensor
    index: torch.Tensor | None
    blocks: torch.Tensor | None
    local: torch.Tensor | None = None
    any_masked: bool = True

    @property
    def num_tokens(self) -> int:
        """T, the token count (without global tokens)."""
        return self.tokens.shape[1]


def prepare_mask(token_mask: torch.Tensor, layout: AttentionLayout) -> LSGMask:
    """Build the `LSGMask` of a batch from its token mask (batch, T), True = may be attended.

    T is the token count after adaptive padding, so it must be a multiple of block_size when it exceeds
    2 * block_size. Global tokens are never masked and are not part of token_mask.
    """
    if token_mask.dtype != torch.bool or token_mask.dim() != 2:
        raise TypeError(f"token_mask must be a 2-D bool tensor (batch, tokens), got {token_mask.dtype} "
                        f"with shape {tuple(token_mask.shape)}")
    n, t = token_mask.shape
    full = torch.cat([token_mask.new_ones(n, layout.num_global_tokens), token_mask], dim=1)
    # A data-dependent shortcut: eager mode skips padding-only masks when nothing is padded; under
    # torch.compile it would break the graph (and specialise on the batch), so compiled code keeps the masks.
    any_masked = torch.compiler.is_compiling() or not bool(token_mask.all())
    # torch.export: the block path at every length (T is whole blocks there), see `_sparse_keys_of_long_inputs`
    export = exporting()
    if not export and layout.uses_full_attention(t):
        return LSGMask(token_mask, full[:, None, None], None, None, any_masked=any_masked)
    if not export and t % layout.block_size:
        raise ValueError(f"{t} tokens is not a multiple of block_size={layout.block_size}; LSG attention needs "
                         "inputs longer than 2 blocks padded to whole blocks (adaptive padding)")
    index, exists = block_key_index(layout, t, token_mask.device)
    if export and layout.has_sparse_keys:
        exists = exists & _sparse_keys_of_long_inputs(layout, index.shape[-1], t, index.device)
    blocks = _source_mask(full, layout)[:, index] & exists
    local = local_columns(layout)
    side = torch.cat([torch.arange(local.start, device=index.device),
                      torch.arange(local.stop, index.shape[-1], device=index.device)])
    side_index = index[..., side]
    if sparse_kind(layout) in ITEM_KINDS:  # items follow the globals directly in the side source
        side_index = torch.where(side_index >= layout.num_global_tokens + t, side_index - t, side_index)
    return LSGMask(token_mask, full[:, None, None], side_index, blocks[..., side], blocks[:, 0, :, local], any_masked)


def _sparse_keys_of_long_inputs(layout: AttentionLayout, key_count: int, num_tokens: int, device: torch.device
                                ) -> torch.Tensor:
    """(K,) bool over a block's key set: False at the sparse keys of inputs of at most two blocks, as a tensor (no
    branch on the length). With them masked, the block path equals the full path there: every token is in every
    block's local window, and the only sparse keys that exist at <= 2 blocks (an odd step's after window, shifted
    into the local window) are duplicates of local keys, which the full path does not have."""
    local = local_columns(layout)
    columns = torch.arange(key_count, device=device)
    sparse = (columns >= layout.num_global_tokens) & ((columns < local.start) | (columns >= local.stop))
    long_input = (torch.arange(num_tokens // layout.block_size, device=device) >= 2).any()
    return ~sparse | long_input


def local_columns(layout: AttentionLayout) -> slice:
    """Where the 3 * bs local keys sit in a block's key set (after the globals and the before window)."""
    start = layout.num_global_tokens + layout.sparse_block_size * layout.has_sparse_keys
    return slice(start, start + 3 * layout.block_size)


def block_key_index(layout: AttentionLayout, num_tokens: int, device: torch.device | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, B, K) source position of every key of every block, and whether that position exists."""
    g, bs, t = layout.num_global_tokens, layout.block_size, num_tokens
    block = torch.arange(t // bs, device=device)[:, None]
    globals_ = torch.arange(g, device=device).expand(block.shape[0], g)  # not len(): a symbolic count under export
    local = (block - 1) * bs + torch.arange(3 * bs, device=device)
    local_exists = (local >= 0) & (local < t)
    parts = [(globals_, torch.ones_like(globals_, dtype=torch.bool)),
             (torch.where(local_exists, g + local, 0), local_exists)]
    if layout.has_sparse_keys:
        before, after = sparse_windows(layout, block.shape[0], device)
        parts.insert(1, _item_sources(before, layout, t))
        parts.append(_item_sources(after, layout, t))
    r = _residues(layout)
    index = torch.cat([i.expand(r, *i.shape[-2:]) for i, _ in parts], dim=-1)
    exists = torch.cat([e.expand(r, *e.shape[-2:]) for _, e in parts], dim=-1)
    return index, exists


def sparse_windows(layout: AttentionLayout, num_blocks: int, device: torch.device | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, sbs) sparse item positions of the before and after windows of every block.

    before: items [(i-1)*step - sbs, (i-1)*step); after: [(i+2)*step, +sbs), shifted 2 items to the left when
    step is odd (the reference's "odd offset", it then overlaps the local window).
    """
    step, sbs = sparse_step(layout), layout.sparse_block_size
    block = torch.arange(num_blocks, device=device)[:, None]
    offsets = torch.arange(sbs, device=device)
    before = (block - 1) * step - sbs + offsets
    after = (block + 2) * step - 2 * (step % 2) + offsets
    return before, after


def _residues(layout: AttentionLayout) -> int:
    """R: how many distinct per-head sparse patterns exist (heads h and h + R share one)."""
    return layout.sparsity_factor if sparse_kind(layout) in {"stride", "block_stride"} else 1


def _item_sources(items: torch.Tensor, layout: AttentionLayout, num_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source positions ((R,) B, w) of sparse item positions (B, w), and whether the items exist."""
    count = num_tokens // layout.sparsity_factor
    exists = (items >= 0) & (items < count)
    items = items.clamp(0, count - 1)
    if sparse_kind(layout) in POSITION_KINDS:
        tokens = sparse_token_positions(layout, num_tokens, items.device)[:, items]
        return torch.where(exists, layout.num_global_tokens + tokens, 0), exists
    return torch.where(exists, layout.num_global_tokens + num_tokens + items, 0), exists


def _source_mask(full: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """(batch, source length) mask of the per-layer source sequence, as far as positions decide it.

    pooling and bos_pooling items are masked iff their whole group is masked; norm and lsh items are left
    unmasked here (their masks depend on the keys).
    """
    kind = sparse_kind(layout)
    if kind in POSITION_KINDS or kind == "none":
        return full
    tokens = full[:, layout.num_global_tokens:]
    if kind in {"pooling", "bos_pooling"}:
        items = group_mask(tokens, layout.sparsity_factor)
    else:
        items = tokens.new_ones(tokens.shape[0], tokens.shape[1] // layout.sparsity_factor)
    return torch.cat([full, items], dim=1)
