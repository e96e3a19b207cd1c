"""`LSGCache`: the constant-size key/value cache of causal LSG, as a transformers `Cache`.

What it keeps, per layer, and why that is exact, is in `lsg_patch/attention/decoding_state.py`. transformers' layers call
`update` with each new key/value; LSG layers keep them in the attention function instead (which also knows the
query, the layer's lsh seed and the layout), so `update` hands them back untouched. Rows are ragged: row r holds
`lengths[r]` real tokens (its padding removed by the stack hook), kept on the host so that a decoding step never
waits on the device to decide which rows complete a block.

One cache belongs to one generation (one batch of sequences), not to the model: threads generating with the same
model each have their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ..attention.decoding_state import BlockItems, block_items, decode_key_mask, item_ring_size, token_slot_positions
from ..attention.layout import AttentionLayout
from ..attention.sparse import sparse_kind, sparse_step

NOT_CROPPABLE = ("an LSGCache cannot drop tokens (crop): its sparse items summarise whole blocks; generate without "
                 "assisted or speculative decoding, or with use_cache=False")


# Sparsity kinds whose items depend on the keys alone: query heads that share a key head share its items.
_KEY_HEAD_ITEMS = frozenset({"norm", "pooling", "raw", "none"})


@dataclass
class LayerState:
    """One layer's cache. Token slots hold the key heads (grouped-query attention keeps its fewer heads); items too
    where they depend on the keys alone (norm, pooling), else one per query head (lsh planes, bos_pooling scores and
    stride patterns are per query head), as the product computes them."""

    global_keys: torch.Tensor  # (batch, kv heads, G, d)
    global_values: torch.Tensor
    token_keys: torch.Tensor  # (batch, kv heads, 2 * bs, d): token p in slot p mod 2 * bs
    token_values: torch.Tensor
    item_keys: torch.Tensor  # (batch, item heads, sbs + step, d): item j in slot j mod (sbs + step)
    item_values: torch.Tensor
    item_mask: torch.Tensor  # (batch, item heads, sbs + step) bool
    query_first: torch.Tensor  # (batch, heads, d): the query of token 0 (bos_pooling)

    def tensors(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def apply(self, function: Any) -> None:
        """Replace every tensor t by function(t) (batch reordering for beam search)."""
        for name in self.tensors():
            setattr(self, name, function(getattr(self, name)))


class LSGCache(Cache):
    """The compressed key/value cache of causal LSG (see the module docstring); pass it as the model's cache
    (`LSGCache()`: it takes the layout of the model it is first passed to) or let lsg_patch create it (generate's
    empty DynamicCache is replaced by one)."""

    def __init__(self, layout: AttentionLayout | None = None, mask_first_token: bool = False) -> None:
        super().__init__(layers=[])
        self.layout: AttentionLayout | None = None
        self.mask_first_token = mask_first_token
        self.items_per_key_head = False
        if layout is not None:
            self.bind(layout, mask_first_token)
        self.states: dict[int, LayerState] = {}
        self.lengths: torch.Tensor | None = None  # (batch,) real tokens per row, on the CPU
        self.next_positions: torch.Tensor | None = None  # (batch,) position id of each row's next token, CPU
        self.columns = 0  # input columns seen (padding included): what generate slices its inputs by
        # (batch, 1, hidden) what each row's token 0 outputs under pool_with_global (BERT-family decoders: global
        # token 0's output, which the prompt replaces it with); read when a row's token 0 comes after the prompt
        self.first_row: torch.Tensor | None = None

    def bind(self, layout: AttentionLayout, mask_first_token: bool) -> None:
        """Take the LSG layout of the model this cache serves (a cache made without one, before its first call)."""
        self.layout = layout
        self.mask_first_token = mask_first_token
        self.items_per_key_head = sparse_kind(layout) in _KEY_HEAD_ITEMS

    # what transformers asks of a cache
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand the new keys/values back: the LSG attention function stores what this layer must keep."""
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        """LSG layers build no dense mask: transformers is told the query alone (a tiny mask nobody reads)."""
        length = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        """No layer is linear attention. transformers' default reads its `layers` (none here), and generate skips
        slicing a continued prompt to its uncached columns when every layer is linear, all([]) included."""
        return [False] * max(len(self.states), 1)

    @property
    def is_initialized(self) -> bool:
        return self.lengths is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.lengths is None else len(self.lengths)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(NOT_CROPPABLE)

    def reset(self) -> None:
        self.states.clear()
        self.lengths, self.next_positions, self.columns, self.first_row = None, None, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for state in self.states.values():
            state.apply(lambda t: t.index_select(0, indices.to(t.device)))
        if self.lengths is not None:
            self.lengths, self.next_positions = (x.index_select(0, indices.cpu())
                                                 for x in (self.lengths, self.next_positions))
        if self.first_row is not None:
            self.first_row = self.first_row.index_select(0, indices.to(self.first_row.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for state in self.states.values():
            state.apply(lambda t: t.repeat_interleave(repeats, dim=0))
        if self.lengths is not None:
            self.lengths, self.next_positions = (x.repeat_interleave(repeats, dim=0)
                                                 for x in (self.lengths, self.next_positions))
        if self.first_row is not None:
            self.first_row = self.first_row.repeat_interleave(repeats, dim=0)

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        return (f"LSGCache(layers={len(self.states)}, rows={self.batch_size}, columns={self.columns}, "
                f"bytes={self.nbytes()})")

    def nbytes(self, layer_idx: int | None = None) -> int:
        """Bytes held, by one layer or all: what the constant-size claim is about."""
        states = self.states.values() if layer_idx is None else [self.states[layer_idx]]
        return sum(getattr(s, n).numel() * getattr(s, n).element_size() for s in states for n in s.tensors())

    # what the stack hook and the attention function do with it
    def start(self, lengths: torch.Tensor, columns: int, next_positions: torch.Tensor) -> None:
        """A prompt arrives: rows of `lengths` real tokens in `columns` input columns, whose next tokens take the
        position ids `next_positions` (all (batch,), any device)."""
        self.states.clear()
        self.lengths, self.columns, self.next_positions = lengths.cpu(), columns, next_positions.cpu()
        self.first_row = None

    def advance(self, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A call of `new_tokens` columns after the prompt (all real): the (batch, new_tokens) CPU token indices
        they take in their rows (what places them in blocks) and their position ids."""
        indices, positions = self.lengths[:, None] + torch.arange(new_tokens), self.upcoming_positions(new_tokens)
        self.lengths, self.next_positions = self.lengths + new_tokens, self.next_positions + new_tokens
        self.columns += new_tokens
        return indices, positions

    def upcoming_positions(self, new_tokens: int) -> torch.Tensor:
        """The (batch, new_tokens) CPU position ids the next call's tokens take, without taking them."""
        return self.next_positions[:, None] + torch.arange(new_tokens)

    def step_masks(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """For every new column, the (batch, 1, K) position mask of its key set (built once for all layers)."""
        return tuple(decode_key_mask(positions[:, j], self.layout, self.mask_first_token).to(device)
                     for j in range(positions.shape[1]))

    def store_prompt(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     repeats: int, token_mask: torch.Tensor, scale: float, lsh_seed: int) -> None:
        """Keep what the tokens after the prompt can read, from the prompt's (batch, heads, G + T, d) tensors
        (key/value with their kv heads; `repeats` query heads per kv head); token_mask: the call's (batch, T)."""
        layout = self.layout
        g, bs = layout.num_global_tokens, layout.block_size
        device = key.device
        slots = token_slot_positions(self.lengths - 1, 2 * bs)
        index = (g + slots.clamp(min=0)).to(device)[:, None, :, None]
        tokens = [x.gather(2, index.expand(-1, x.shape[1], -1, x.shape[-1])) for x in (key, value)]
        query_first = query[:, :, g]
        items = self._prompt_items(query_first, key[:, :, g:], value[:, :, g:], repeats, token_mask, scale, lsh_seed)
        self.states[layer_idx] = LayerState(key[:, :, :g], value[:, :, :g], *tokens, *items, query_first)

    def _prompt_items(self, query_first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, repeats: int,
                      token_mask: torch.Tensor, scale: float, lsh_seed: int) -> BlockItems:
        """The item ring after the prompt's (batch, kv heads, T, d) token keys/values: in every row, the items of
        its latest whole blocks, computed only for the blocks some row keeps (items depend on their block alone)."""
        ring, bs = item_ring_size(self.layout), self.layout.block_size
        heads = keys.shape[1] if self.items_per_key_head else query_first.shape[1]
        empty = keys.new_zeros(keys.shape[0], heads, ring, keys.shape[-1])
        allowed = torch.zeros(keys.shape[0], heads, ring, dtype=torch.bool, device=keys.device)
        if not ring:
            return BlockItems(empty, empty.clone(), allowed)
        step = sparse_step(self.layout)
        kept = token_slot_positions(self.lengths // bs * step - 1, ring)  # item index held by every slot
        if not bool((kept >= 0).any()):  # no row has a whole block yet: the ring starts empty
            return BlockItems(empty, empty.clone(), allowed)
        first, last = int(kept[kept >= 0].min()) // step, int(kept.max()) // step + 1  # blocks
        items = self._items(query_first, keys[:, :, first * bs : last * bs], values[:, :, first * bs : last * bs],
                            repeats, token_mask[:, first * bs : last * bs], scale, lsh_seed)
        take = (kept - first * step).clamp(min=0).to(keys.device)[:, None].expand(-1, heads, -1)
        item_keys, item_values = (x.gather(2, take[..., None].expand(-1, -1, -1, x.shape[-1]))
                                  for x in (items.keys, items.values))
        return BlockItems(item_keys, item_values, items.mask.gather(2, take) & (kept >= 0).to(keys.device)[:, None])

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, repeats: int,
               positions: torch.Tensor, masks: tuple[torch.Tensor, ...], scale: float, dropout: float,
               lsh_seed: int) -> torch.Tensor:
        """The LSG attention of new token queries (batch, heads, s, d) with their keys/values (batch, kv heads, s,
        d), one column at a time: each is written to its slot, attends to its key set, and completes a block's
        items when it is the block's last token. Returns (batch, heads, s, d)."""
        state = self.states[layer_idx]
        bs = self.layout.block_size
        rows = torch.arange(query.shape[0], device=query.device)
        outputs = []
        for j in range(query.shape[2]):
            slot = (positions[:, j] % (2 * bs)).to(query.device)
            state.token_keys[rows, :, slot] = key[:, :, j]
            state.token_values[rows, :, slot] = value[:, :, j]
            first = positions[:, j] == 0  # a row whose prompt was all padding: its token 0 arrives only now
            if bool(first.any()):  # out of place: query_first may be a view of the prompt's query
                state.query_first = torch.where(first.to(query.device)[:, None, None], query[:, :, j],
                                                state.query_first)
            keys, values = (self._key_set(*parts, repeats) for parts in (
                (state.global_keys, state.token_keys, state.item_keys),
                (state.global_values, state.token_values, state.item_values)))
            item_mask = state.item_mask if state.item_mask.shape[1] == query.shape[1] else \
                state.item_mask.repeat_interleave(repeats, dim=1)
            allowed = masks[j] & F.pad(item_mask, (keys.shape[2] - item_mask.shape[2], 0), value=True)
            outputs.append(F.scaled_dot_product_attention(query[:, :, j : j + 1], keys, values,
                                                          attn_mask=allowed[:, :, None], dropout_p=dropout,
                                                          scale=scale, enable_gqa=keys.shape[1] != query.shape[1]))
            self._complete_blocks(state, positions[:, j], repeats, scale, lsh_seed)
        return torch.cat(outputs, dim=2)

    def _key_set(self, globals_: torch.Tensor, tokens: torch.Tensor, items: torch.Tensor, repeats: int
                 ) -> torch.Tensor:
        """[globals; token slots; item slots]: per key head where the items are (SDPA shares each with its query
        heads), else per query head (key heads repeated)."""
        if self.items_per_key_head:
            return torch.cat([globals_, tokens, items], dim=2)
        return torch.cat([torch.cat([globals_, tokens], dim=2).repeat_interleave(repeats, dim=1), items], dim=2)

    def _complete_blocks(self, state: LayerState, positions: torch.Tensor, repeats: int, scale: float,
                         lsh_seed: int) -> None:
        """Compute the items of the blocks whose last token sits at `positions` (the rows where one does)."""
        ring = item_ring_size(self.layout)
        bs = self.layout.block_size
        done = ((positions + 1) % bs == 0).nonzero().flatten()
        if not ring or len(done) == 0:
            return
        block = positions[done] // bs
        device = state.token_keys.device
        slots = ((block % 2)[:, None] * bs + torch.arange(bs)).to(device)[:, None, :, None]
        rows = done.to(device)
        keys, values = (x[rows].gather(2, slots.expand(-1, x.shape[1], -1, x.shape[-1]))
                        for x in (state.token_keys, state.token_values))
        token_mask = torch.ones(len(done), bs, dtype=torch.bool)
        if self.mask_first_token:
            token_mask[:, 0] = block != 0
        items = self._items(state.query_first[rows], keys, values, repeats, token_mask.to(device), scale, lsh_seed)
        step = sparse_step(self.layout)
        targets = ((block[:, None] * step + torch.arange(step)) % ring).to(device)
        state.item_keys[rows[:, None], :, targets] = items.keys.transpose(1, 2)
        state.item_values[rows[:, None], :, targets] = items.values.transpose(1, 2)
        state.item_mask[rows[:, None], :, targets] = items.mask.transpose(1, 2)

    def _items(self, query_first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, repeats: int,
               token_mask: torch.Tensor, scale: float, lsh_seed: int) -> BlockItems:
        """Items of whole blocks of key-head tokens: per key head where they depend on the keys alone, else per
        query head (keys repeated, as the product sees them)."""
        if not self.items_per_key_head:
            keys, values = (x.repeat_interleave(repeats, dim=1) for x in (keys, values))
        return block_items(query_first, keys, values, token_mask, self.layout, scale, lsh_seed)
