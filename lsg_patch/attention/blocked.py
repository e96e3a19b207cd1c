"""LSG block attention through explicit scores, softmax and matrix products: the kernel for attention dropout and
for scores that take a gradient (a relative position bias whose table trains).

The CPU flash kernel has neither, and SDPA with dropout keeps every block's probabilities and dropout mask. Here
the token blocks of one batch row are processed a few blocks at a time (all heads at once): a chunk's key set is
its local windows (a view of the keys, zero-padded only at the sequence ends) followed by its side keys (read
from the side source by row), so only one chunk's scores are alive at once. Dropout uses the counter-based
keep-mask of `dropout.py`, regenerated in the backward from the row and key codes, never stored; the backward
recomputes each chunk's scores and probabilities (one more score product) and keeps nothing but the inputs and
the output, like a flash kernel. Public ops only, so every device can run it.

Grouped-query attention: keys and values may have fewer heads than the queries. A chunk then stacks the rows of
the query heads that share a key head (`fold`), so each key head's key set is built once and its gradients sum
over those heads inside the matrix products; the rows are put back in query-head order afterwards (`unfold`).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dropout import DropoutCodes, keep_mask
from .plan import Plan

CHUNK_SCORES = 1 << 19  # scores per chunk on the CPU (2 MiB in float32): a chunk's working set stays in the caches
DEVICE_CHUNK_SCORES = 1 << 24  # elsewhere (GPUs): fewer, larger chunks, as kernel launches cost more than caches


def rows_addressable(source: torch.Tensor) -> bool:
    """Whether every d-row of `source` is one contiguous row of its dense storage, whatever the dimension order."""
    d = source.shape[-1]
    strides = [stride for size, stride in zip(source.shape[:3], source.stride()[:3]) if size > 1]
    dense = source.permute(sorted(range(4), key=lambda i: -source.stride(i))).is_contiguous()
    return source.stride(-1) == 1 and not any(s % d for s in strides) and dense


class _Rows:
    """The d-rows of a (batch, heads, L, d) tensor's storage, addressed by (batch, head, row) with index_select."""

    def __init__(self, source: torch.Tensor) -> None:
        if torch.compiler.is_compiling() or not rows_addressable(source):  # compiled code cannot sort strides
            source = source.contiguous()
        d = source.shape[-1]
        self.strides = [s // d if size > 1 else 0 for size, s in zip(source.shape[:3], source.stride()[:3])]
        self.storage = source.as_strided((source.numel() // d, d), (d, 1))
        self.heads = torch.arange(source.shape[1], device=source.device)[:, None] * self.strides[1]

    def offsets(self, batch: int, rows: torch.Tensor) -> torch.Tensor:
        """Storage rows of rows (heads or 1, k) of batch row `batch`: (heads * k,)."""
        return torch.add(self.heads + batch * self.strides[0], rows, alpha=self.strides[2]).flatten()

    def take(self, batch: int, rows: torch.Tensor) -> torch.Tensor:
        """(heads, k, d) rows of one batch row."""
        return self.storage.index_select(0, self.offsets(batch, rows)).view(len(self.heads), -1,
                                                                             self.storage.shape[1])


class BlockedAttention(torch.autograd.Function):
    """LSG attention (batch, heads, G + T, d) with dropout and/or differentiable additive scores; returned laid out
    as (batch, G + T, heads, d) (merging the heads afterwards is free).

    side_keys / side_values: the side source (None: key / value themselves). local_scores (batch * heads or 1,
    B or 1, bs or 1, width) and side_scores (batch * heads or 1, B, bs or 1, Ks): the additive scores of the two
    parts (masks, plus a bias), whose gradients are returned when they require one. codes: the dropout of the call
    (None: no dropout).
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                side_keys: torch.Tensor | None, side_values: torch.Tensor | None, local_scores: torch.Tensor,
                side_scores: torch.Tensor, plan: Plan, codes: DropoutCodes | None) -> torch.Tensor:
        n, h, length, d = query.shape
        out = torch.empty(n, length, h, d, dtype=query.dtype, device=query.device).transpose(1, 2)
        inputs = _inputs(query, key, value, side_keys, side_values, local_scores, side_scores, plan, codes)
        work = _Workspace()
        for chunk in _chunks(query, plan):
            q, k, v, scores, keep = chunk.build(inputs, work)
            probs = torch.softmax(scores, dim=-1, out=scores)  # in place: the working set stays small
            if keep is not None:
                probs.mul_(keep)
            rows = probs @ v
            if codes is not None:
                rows.mul_(1 / (1 - codes.p))
            chunk.rows_of(out).copy_(chunk.unfold(rows, h))
        ctx.save_for_backward(query, key, value, side_keys, side_values, local_scores, side_scores, out)
        ctx.plan, ctx.codes = plan, codes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, side_keys, side_values, local_scores, side_scores, out = ctx.saved_tensors
        plan, codes = ctx.plan, ctx.codes
        heads, key_heads = query.shape[1], key.shape[1]
        inputs = _inputs(query, key, value, side_keys, side_values, local_scores, side_scores, plan, codes)
        dquery = torch.empty_like(query)
        dkey, dvalue = torch.zeros_like(key), torch.zeros_like(value)
        dside_keys, dside_values = (None if s is None else torch.zeros_like(s) for s in (side_keys, side_values))
        grads = _Grads(dkey, dvalue, _Rows(dkey if dside_keys is None else dside_keys),
                       _Rows(dvalue if dside_values is None else dside_values),
                       *(torch.zeros_like(s) if need else None
                         for s, need in zip((local_scores, side_scores), ctx.needs_input_grad[5:7])))
        keep_scale = 1.0 if codes is None else 1 / (1 - codes.p)
        work = _Workspace()
        for chunk in _chunks(query, plan):
            q, k, v, scores, keep = chunk.build(inputs, work)
            probs = torch.softmax(scores, dim=-1, out=scores)
            grad = chunk.fold(chunk.rows_of(grad_out), key_heads)
            total = (grad * chunk.fold(chunk.rows_of(out), key_heads)).sum(dim=-1, keepdim=True)  # sum_j P dP
            if keep_scale != 1.0:
                grad = grad * keep_scale
            kept = probs if keep is None else torch.mul(probs, keep, out=work.get("hash", *_like(probs)))  # spent
            dv = kept.transpose(-1, -2) @ grad
            dscore = torch.matmul(grad, v.transpose(-1, -2), out=work.get("hash", *_like(probs)))  # kept is spent
            if keep is not None:
                dscore.mul_(keep)
            dscore.sub_(total).mul_(probs)
            chunk.rows_of(dquery).copy_(chunk.unfold(dscore @ k, heads).mul_(plan.scale))
            chunk.add_grads(dscore.transpose(-1, -2) @ q, dv, dscore, grads, plan)
        return (dquery, dkey, dvalue, dside_keys, dside_values, grads.local_scores, grads.side_scores, None, None)


class _Workspace:
    """Byte buffers that every chunk of one call reuses, by name, viewed as any dtype: allocating and first touching
    fresh chunk-sized tensors for every chunk costs more than some of the arithmetic done on them, and buffers
    whose contents are spent are reused under another dtype (the hashes become the kept probabilities)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Buffer `name` as a tensor of this shape and dtype (contents undefined), grown when too small."""
        size = math.prod(shape)
        nbytes = size * dtype.itemsize
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.buffers[name] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buffer[:nbytes].view(dtype).view(shape)


class _Inputs(NamedTuple):
    """The forward's inputs, with the rows the side keys and values are read from."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    sides: tuple[_Rows, _Rows]
    local_scores: torch.Tensor
    side_scores: torch.Tensor
    plan: Plan
    codes: DropoutCodes | None


def _inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, side_keys: torch.Tensor | None,
            side_values: torch.Tensor | None, local_scores: torch.Tensor, side_scores: torch.Tensor, plan: Plan,
            codes: DropoutCodes | None) -> _Inputs:
    sides = (_Rows(key if side_keys is None else side_keys), _Rows(value if side_values is None else side_values))
    return _Inputs(query, key, value, sides, local_scores, side_scores, plan, codes)


class _Grads(NamedTuple):
    """The backward's accumulators: key and value gradients, the rows the side gradients go to (the key / value
    gradients or the side source's), and the score gradients (None: not needed)."""

    key: torch.Tensor
    value: torch.Tensor
    side_keys: _Rows
    side_values: _Rows
    local_scores: torch.Tensor | None
    side_scores: torch.Tensor | None


def _chunks(query: torch.Tensor, plan: Plan) -> Iterator[_GlobalRows | _TokenBlocks]:
    """The global query rows and the token blocks of every batch row, in chunks of about CHUNK_SCORES scores (on
    the CPU; DEVICE_CHUNK_SCORES elsewhere), at least one block or row of every head."""
    n, h, length, _ = query.shape
    g, bs = plan.num_global, plan.block_size
    blocks, keys = (length - g) // bs, plan.global_keys(length)
    scores = CHUNK_SCORES if query.device.type == "cpu" else DEVICE_CHUNK_SCORES
    rows = max(1, scores // (h * keys))
    per_chunk = max(1, scores // (h * bs * (plan.width + plan.side_count)))
    for batch in range(n):
        for start in range(0, g, rows):
            yield _GlobalRows(batch, start, min(start + rows, g), keys)
        for start in range(0, blocks, per_chunk):
            stop = min(start + per_chunk, blocks)
            yield _TokenBlocks(batch, start, stop, slice(g + start * bs, g + stop * bs))


def _keep(rows: torch.Tensor, keys: torch.Tensor, p: float, shape: tuple[int, ...], dtype: torch.dtype,
          work: _Workspace) -> torch.Tensor:
    """The keep-mask of a chunk (`dropout.keep_mask`) in the workspace's buffers, as 0 / 1 of the scores' dtype
    (multiplying by a bool mask converts it first, which costs more than making it)."""
    hashes = tuple(work.get(name, shape, torch.int32, rows.device) for name in ("hash", "keep"))
    return keep_mask(rows, keys, p, out=work.get("keep", shape, dtype, rows.device), work=hashes)  # shifts spent


def _like(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
    """Shape, dtype and device of a tensor: the arguments of `_Workspace.get` for a buffer like it."""
    return tuple(tensor.shape), tensor.dtype, tensor.device


class _GlobalRows(NamedTuple):
    """Global query rows [start, stop) of one batch row: they attend to the first `keys` keys."""

    batch: int
    start: int
    stop: int
    keys: int

    def build(self, inputs: _Inputs, work: _Workspace) -> tuple[torch.Tensor, ...]:
        """Scaled queries (key heads, group * r, d), keys and values (key heads, keys, d), scores (key heads,
        group * r, keys), keep-mask."""
        plan, codes = inputs.plan, inputs.codes
        key_heads = inputs.key.shape[1]
        q = self.fold(inputs.query[self.batch, :, self.start:self.stop] * plan.scale, key_heads)
        k, v = (x[self.batch, :, :self.keys] for x in (inputs.key, inputs.value))
        shape = (q.shape[0], q.shape[1], self.keys)
        scores = torch.matmul(q, k.transpose(-1, -2), out=work.get("scores", shape, q.dtype, q.device))
        if plan.global_mask is not None:
            scores += plan.global_mask[self.batch, 0, :, :self.keys]
        keep = None
        if codes is not None:
            rows = self.fold(codes.rows[self.batch, :, self.start:self.stop, None], key_heads)
            keep = _keep(rows, codes.full[:self.keys], codes.p, shape, q.dtype, work)
        return q, k, v, scores, keep

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """This chunk's rows (heads, r, d) of a (batch, heads, G + T, d) tensor."""
        return x[self.batch, :, self.start:self.stop]

    def fold(self, rows: torch.Tensor, key_heads: int) -> torch.Tensor:
        """Rows (heads, r, x) -> (key heads, group * r, x): the rows of the query heads of one key head together."""
        return rows.reshape(key_heads, -1, rows.shape[-1])

    def unfold(self, folded: torch.Tensor, heads: int) -> torch.Tensor:
        """`fold` undone: (key heads, group * r, d) -> (heads, r, d)."""
        return folded.reshape(heads, -1, folded.shape[-1])

    def add_grads(self, dk: torch.Tensor, dv: torch.Tensor, dscore: torch.Tensor, grads: _Grads, plan: Plan) -> None:
        """Key and value gradients of the first `keys` keys (global rows have no score gradient: no bias)."""
        grads.key[self.batch, :, :self.keys] += dk
        grads.value[self.batch, :, :self.keys] += dv


class _TokenBlocks(NamedTuple):
    """Token blocks [start, stop) of one batch row, all heads."""

    batch: int
    start: int
    stop: int
    rows: slice  # the query rows of the blocks

    def build(self, inputs: _Inputs, work: _Workspace) -> tuple[torch.Tensor, ...]:
        """Scaled queries (key heads, c, group * bs, d), keys and values (key heads, c, width + Ks, d), scores
        (key heads, c, group * bs, width + Ks) and keep-mask (None without dropout)."""
        plan, codes, query = inputs.plan, inputs.codes, inputs.query
        h, d = inputs.key.shape[1], query.shape[-1]
        c, width = self.stop - self.start, plan.width
        q = self.fold(self.rows_of(query) * plan.scale, h)
        side_rows = self._side_rows(plan)
        shape = (h, c, width + plan.side_count, d)
        k, v = (torch.cat([self._windows(x, plan), rows.take(self.batch, side_rows).view(h, c, -1, d)], dim=2,
                          out=work.get(name, shape, x.dtype, x.device))
                for name, x, rows in zip(("keys", "values"), (inputs.key, inputs.value), inputs.sides))
        shape = (h, c, q.shape[2], shape[2])
        scores = torch.matmul(q, k.transpose(-1, -2), out=work.get("scores", shape, q.dtype, q.device))
        by_head = scores.view(h, c, -1, plan.block_size, shape[3])  # (key heads, c, group, bs, keys)
        by_head[..., :width] += self._part(inputs.local_scores, h)[:, :, None]
        by_head[..., width:] += self._part(inputs.side_scores, h)[:, :, None]
        keep = None
        if codes is not None:
            rows = self.fold(codes.rows[self.batch, :, self.rows, None], h)
            keys = torch.cat([codes.local[self.start:self.stop], codes.side[self.start:self.stop]], dim=1)
            keep = _keep(rows, keys[:, None], codes.p, shape, q.dtype, work)
        return q, k, v, scores, keep

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """This chunk's query rows (heads, c * bs, d) of a (batch, heads, G + T, d) tensor."""
        return x[self.batch, :, self.rows]

    def fold(self, rows: torch.Tensor, key_heads: int) -> torch.Tensor:
        """Rows (heads, c * bs, x) -> (key heads, c, group * bs, x): block by block, the rows of the query heads
        of one key head together (head-major within a block). A view when group is 1 and rows are contiguous."""
        heads, _, x = rows.shape
        c = self.stop - self.start
        grouped = rows.reshape(key_heads, heads // key_heads, c, -1, x).transpose(1, 2)
        return grouped.reshape(key_heads, c, -1, x)

    def unfold(self, folded: torch.Tensor, heads: int) -> torch.Tensor:
        """`fold` undone: (key heads, c, group * bs, d) -> (heads, c * bs, d)."""
        key_heads, c, _, d = folded.shape
        return folded.view(key_heads, c, heads // key_heads, -1, d).transpose(1, 2).reshape(heads, -1, d)

    def add_grads(self, dk: torch.Tensor, dv: torch.Tensor, dscore: torch.Tensor, grads: _Grads, plan: Plan) -> None:
        """Fold the window gradients into the token rows, add the side gradients to their source rows, and the
        score gradients to the additive scores they came from (summed over what those broadcast)."""
        width, d = plan.width, dk.shape[-1]
        side_rows = self._side_rows(plan)
        for full, rows, grad in ((grads.key, grads.side_keys, dk), (grads.value, grads.side_values, dv)):
            self._fold_windows(grad[:, :, :width], full, plan)
            rows.storage.index_add_(0, rows.offsets(self.batch, side_rows), grad[:, :, width:].reshape(-1, d))
        for target, part in ((grads.local_scores, dscore[..., :width]), (grads.side_scores, dscore[..., width:])):
            if target is not None:
                view = self._part(target, dscore.shape[0])
                dims = [i for i, (t, s) in enumerate(zip(view.shape, part.shape)) if t == 1 and s != 1]
                view += part.sum(dims, keepdim=True) if dims else part

    def _side_rows(self, plan: Plan) -> torch.Tensor:
        """Source rows (heads or 1, c * Ks) of the blocks' side keys."""
        ks = plan.side_count
        return plan.rows[self.batch if plan.rows.shape[0] > 1 else 0, :, self.start * ks:self.stop * ks]

    def _part(self, scores: torch.Tensor, heads: int) -> torch.Tensor:
        """The blocks' view (heads or 1, c or 1, bs or 1, keys) of additive scores (batch * heads or 1, B or 1, ...)."""
        if scores.shape[0] > 1:
            scores = scores[self.batch * heads:(self.batch + 1) * heads]
        return scores[:, self.start:self.stop] if scores.shape[1] > 1 else scores

    def _windows(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(heads, c, width, d): block i sees tokens (i-1)*bs .. (i-1)*bs + width of x (batch, heads, G + T, d); a
        view of x, except at the ends of the sequence, where the chunk's tokens are zero-padded (those keys are
        masked)."""
        g, bs, width = plan.num_global, plan.block_size, plan.width
        tokens = x[self.batch, :, g:]
        start, stop = (self.start - 1) * bs, (self.stop - 2) * bs + width
        low, high = max(start, 0), min(stop, tokens.shape[1])
        piece = tokens[:, low:high]
        if low > start or high < stop:
            piece = F.pad(piece, (0, 0, low - start, stop - high))
        return piece.unfold(1, width, bs).transpose(-1, -2)

    def _fold_windows(self, grad: torch.Tensor, full: torch.Tensor, plan: Plan) -> None:
        """Add window gradients (heads, c, width, d) to the token rows of full (batch, heads, G + T, d): slab s of
        block i's window is token block i - 1 + s."""
        g, bs = plan.num_global, plan.block_size
        tokens = full[self.batch, :, g:].unflatten(1, (-1, bs))
        for slab in range(plan.width // bs):
            offset = self.start - 1 + slab
            low, high = max(offset, 0), min(self.stop - 1 + slab, tokens.shape[1])
            if low < high:
                tokens[:, low:high] += grad[:, low - offset:high - offset, slab * bs:(slab + 1) * bs]
