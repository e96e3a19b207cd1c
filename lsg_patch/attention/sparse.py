"""The sparse keys of LSG attention (LSG_SPEC.md section 7), as pure tensor functions.

Every sparsity type turns the T token keys/values of one layer into S = T / sparsity_factor "sparse items"
in token order. Three families exist:

* position types ("raw" for sparsity_factor 1, "stride", "block_stride") only pick token positions, which
  depend on the layout and the head alone. They are never materialised: `sparse_token_positions` gives the
  positions and the block key index of `prepare_mask` points straight at the tokens.
* "norm" picks token positions too, but per layer and head, from the keys (`norm_positions`); the attention
  product gathers the picked keys straight into the blocks' key sets.
* item types ("pooling", "bos_pooling", "lsh") compute new key/value vectors every layer (`sparse_items`),
  placed behind the global keys by the attention product.

Shapes: keys/values (batch, heads, T, d); token_mask (batch, T) bool, True = may be attended.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .layout import AttentionLayout

POSITION_KINDS = frozenset({"raw", "stride", "block_stride"})
ITEM_KINDS = frozenset({"norm", "pooling", "bos_pooling", "lsh"})


class SparseItems(NamedTuple):
    """Sparse key/value items (batch, heads, S, d) and their mask.

    `mask` is (batch, heads, S) bool for types whose mask depends on the keys (lsh), and None where it
    depends on token positions only (pooling, bos_pooling): `prepare_mask` has then already put it into the
    block mask, once per forward pass.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None


def sparse_kind(layout: AttentionLayout) -> str:
    """The selection that actually runs: "none", "raw" (sparsity_factor 1, any type) or a sparsity type.

    lsh with sparsity_factor == sparse_block_size runs bos_pooling, as in the reference.
    """
    if not layout.has_sparse_keys:
        return "none"
    if layout.sparsity_factor == 1:
        return "raw"
    if layout.sparsity_type == "lsh" and layout.sparsity_factor == layout.sparse_block_size:
        return "bos_pooling"
    return layout.sparsity_type


def sparse_step(layout: AttentionLayout) -> int:
    """Sparse items owned by one block (block_size / sparsity_factor)."""
    return layout.block_size // layout.sparsity_factor


def chunk_size(layout: AttentionLayout) -> int:
    """Token chunk of norm and lsh: the reference's min(block_size, sparse_block_size), made always valid.

    The reference needs the chunk to divide the token count and to be a multiple of sparsity_factor; it fails
    otherwise. We take the largest multiple of sparsity_factor that divides block_size and is at most
    max(min(block_size, sparse_block_size), sparsity_factor): that is min(block_size, sparse_block_size)
    itself for every layout where the reference's chunking is regular (e.g. powers of two).
    """
    sf, bs = layout.sparsity_factor, layout.block_size
    limit = max(min(bs, layout.sparse_block_size), sf)
    return max(c for c in range(sf, limit + 1, sf) if bs % c == 0)


def group_mask(token_mask: torch.Tensor, group: int) -> torch.Tensor:
    """(batch, T // group) bool: True where a group of consecutive tokens has at least one valid token."""
    return token_mask.unflatten(-1, (-1, group)).any(dim=-1)


def sparse_token_positions(layout: AttentionLayout, num_tokens: int, device: torch.device | None = None
                           ) -> torch.Tensor:
    """(R, S) token position of every sparse item of a position type; head h uses row h % R.

    raw: every token (R = 1). stride: tokens j*sf + (h mod sf). block_stride: inside every block the
    sub-block h mod sf, i.e. tokens b*bs + ((h*step + r) mod bs) (R = sf for both).
    """
    kind, sf = sparse_kind(layout), layout.sparsity_factor
    items = torch.arange(num_tokens // sf, device=device)
    residues = torch.arange(sf, device=device)[:, None]
    if kind == "raw":
        return items[None]
    if kind == "stride":
        return items * sf + residues
    if kind == "block_stride":
        step, bs = sparse_step(layout), layout.block_size
        block, offset = items // step, items % step
        return block * bs + residues * step + offset  # (h*step + r) mod bs, as residues*step + r < bs
    raise ValueError(f"sparsity kind {kind!r} does not select token positions")


def sparse_items(query_first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 token_mask: torch.Tensor, layout: AttentionLayout, scale: float, *, lsh_seed: int = 0
                 ) -> SparseItems:
    """Compute the sparse items of pooling, bos_pooling or lsh (see the module docstring).

    query_first (batch, heads, d) is the query of token 0, used by bos_pooling; scale is the score scale of
    the attention product, reused for bos_pooling's scores. lsh_seed seeds lsh's hyperplanes
    (`lsh_hyperplanes`); pass a different one per layer.
    """
    kind = sparse_kind(layout)
    if kind == "pooling":
        return mean_pooling_items(keys, values, token_mask, layout.sparsity_factor)
    if kind == "bos_pooling":
        return bos_pooling_items(query_first, keys, values, token_mask, layout.sparsity_factor, scale)
    if kind == "lsh":
        planes = lsh_hyperplanes(layout, keys.shape[1], keys.shape[-1], seed=lsh_seed, dtype=keys.dtype,
                                 device=keys.device)
        return lsh_items(keys, values, token_mask, layout, planes)
    raise ValueError(f"sparsity kind {kind!r} has no sparse items")


# Key norms closer than this (relative) are equal for norm's choice, which then prefers the later token: two keys of
# equal norm in exact arithmetic (the same token at two positions under rotary embeddings, which keep the norm) are
# otherwise told apart by their rounding, which differs between dtypes, devices and a cached and an uncached pass.
NORM_TIE_TOLERANCE = 1e-5


def norm_positions(keys: torch.Tensor, token_mask: torch.Tensor | None, layout: AttentionLayout) -> torch.Tensor:
    """(batch, heads, S) token positions of the norm items.

    In every chunk of c tokens the c / sf keys of largest norm, in ascending norm order within the chunk, as in
    the reference; norms within NORM_TIE_TOLERANCE (relative) of each other are one norm, and among equal norms
    the later token ranks higher (`norm_ranks`). Masked tokens count as norm 0 (token_mask None: nothing is
    masked); a chosen padded token stays masked (the caller takes its mask along). Not differentiated.
    """
    c = chunk_size(layout)
    per_chunk = c // layout.sparsity_factor
    t = keys.shape[2]
    norms = keys.detach().float().norm(dim=-1) if keys.element_size() < 4 else keys.detach().norm(dim=-1)
    if token_mask is not None:
        norms = norms.masked_fill(~token_mask[:, None], 0)
    order = norm_ranks(norms.unflatten(-1, (t // c, c))).argsort(dim=-1, stable=True)[..., c - per_chunk:]
    return (order + torch.arange(0, t, c, device=keys.device)[:, None]).flatten(-2)


def norm_ranks(norms: torch.Tensor) -> torch.Tensor:
    """The rank of every norm along the last dimension, counting norms within NORM_TIE_TOLERANCE (relative) of the
    next smaller one as equal (they share its rank, chained): sorting by rank, stably, then breaks ties by position
    and never by rounding, unless two different norms lie about the tolerance apart."""
    ascending, order = norms.sort(dim=-1, stable=True)
    steps = ascending[..., 1:] - ascending[..., :-1] > NORM_TIE_TOLERANCE * ascending[..., 1:]
    ranks = F.pad(steps.cumsum(dim=-1), (1, 0))
    return torch.empty_like(ranks).scatter_(-1, order, ranks)


def mean_pooling_items(keys: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor,
                       group: int) -> SparseItems:
    """Mean of the valid tokens of every group of sf tokens: sum / (count + 1e-6), as the reference."""
    valid = token_mask[:, None, :, None]
    count = token_mask.unflatten(-1, (-1, group)).sum(dim=-1).to(keys.dtype)[:, None, :, None] + 1e-6

    def pool(x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(~valid, 0).unflatten(2, (-1, group)).sum(dim=3) / count

    return SparseItems(pool(keys), pool(values), None)


def bos_pooling_items(query_first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      token_mask: torch.Tensor, group: int, scale: float) -> SparseItems:
    """Softmax-weighted sum of every group of sf tokens, weighted by the scores of token 0's query.

    Masked members score finfo.min (the reference adds it, which rounds to the same value), so a fully masked
    group gets finite uniform weights; its item is masked anyway (deliberate difference 1, set by
    `prepare_mask`).
    """
    grouped_keys = keys.unflatten(2, (-1, group))
    grouped_values = values.unflatten(2, (-1, group))
    scores = (grouped_keys @ query_first[:, :, None, :, None]).squeeze(-1) * scale
    masked = ~token_mask.unflatten(-1, (-1, group))[:, None]
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)[..., None, :]
    return SparseItems((weights @ grouped_keys).squeeze(-2), (weights @ grouped_values).squeeze(-2), None)


def lsh_hyperplanes(layout: AttentionLayout, heads: int, head_dim: int, *, seed: int, dtype: torch.dtype,
                    device: torch.device | str | None) -> list[torch.Tensor]:
    """The random hyperplanes of every lsh round: lsh_num_pre_rounds rounds into c buckets, then one into c / sf.

    Round r's planes are (heads, 1, head_dim, max(buckets // 2, 1)), standard normal. They come from a fresh
    CPU generator seeded with `seed` (no global or shared RNG state is read or advanced), drawn in float32 and
    only then cast and moved: the same seed gives the same planes on every device and, up to rounding, in
    every dtype, so a layer hashes alike on CPU and GPU and a test can recompute them.
    """
    c = chunk_size(layout)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    planes = []
    for buckets in [c] * layout.lsh_num_pre_rounds + [c // layout.sparsity_factor]:
        drawn = torch.randn(heads, 1, head_dim, max(buckets // 2, 1), generator=generator, dtype=torch.float32)
        planes.append(drawn.to(device=device, dtype=dtype))
    return planes


def lsh_items(keys: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor, layout: AttentionLayout,
              planes: list[torch.Tensor]) -> SparseItems:
    """Mean of the keys/values that hyperplanes hash into the same bucket, per chunk of c tokens.

    As the reference: masked tokens are zeroed and count for nothing; lsh_num_pre_rounds rounds hash the
    c tokens of a chunk into c buckets (bucket sums), a last round into c / sf buckets; an item is the
    bucket sum / (count + 1e-8) and is masked iff its bucket is empty. Unlike the reference, which draws new
    planes with torch.randn on every forward, the planes (`lsh_hyperplanes`, one tensor per round) are fixed
    by a seed that the caller chooses per layer: results are reproducible, two calls on the same input are
    bit-identical, and layers still hash differently from one another.
    """
    c = chunk_size(layout)
    valid = token_mask[:, None, :, None]
    keys = keys.masked_fill(~valid, 0).unflatten(2, (-1, c))
    values = values.masked_fill(~valid, 0).unflatten(2, (-1, c))
    count = valid.expand(-1, keys.shape[1], -1, -1).to(keys.dtype).unflatten(2, (-1, c))
    rounds = [c] * layout.lsh_num_pre_rounds + [c // layout.sparsity_factor]
    if len(planes) != len(rounds):
        raise ValueError(f"lsh needs {len(rounds)} rounds of hyperplanes "
                         f"(lsh_num_pre_rounds={layout.lsh_num_pre_rounds} + 1), got {len(planes)}")
    for buckets, round_planes in zip(rounds, planes):
        keys, values, count = _lsh_round(keys, values, count, buckets, round_planes)
    # 1e-8 vanishes in float16: an empty bucket (masked anyway) divides by 1 instead of making 0 / 0 = NaN
    denominator = torch.where(count > 0, count + 1e-8, torch.ones_like(count))
    return SparseItems((keys / denominator).flatten(2, 3), (values / denominator).flatten(2, 3),
                       (count > 0).flatten(2))


def _lsh_round(keys: torch.Tensor, values: torch.Tensor, count: torch.Tensor, buckets: int, planes: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum keys, values and counts (batch, heads, chunks, rows, .) into `buckets` rows by a hyperplane hash.

    A key's bucket is the argmax over [x.P, -x.P] of its direction x for the buckets // 2 planes P of its head
    (planes: (heads, 1, d, max(buckets // 2, 1))), as in the reference: with an odd count the last bucket stays
    empty. A single bucket takes every key (the reference fails there).
    """
    with torch.no_grad():
        projections = F.normalize(keys, dim=-1) @ planes
        bucket = torch.cat([projections, -projections], dim=-1).argmax(dim=-1, keepdim=True) % buckets
    return _bucket_sum(keys, bucket, buckets), _bucket_sum(values, bucket, buckets), _bucket_sum(count, bucket, buckets)


def _bucket_sum(x: torch.Tensor, bucket: torch.Tensor, buckets: int, *, one_hot: bool | None = None) -> torch.Tensor:
    """Rows of x (batch, heads, chunks, rows, e) summed per bucket (bucket: (batch, heads, chunks, rows, 1)).

    Bit-reproducible on every device: on CPU scatter_add adds in a fixed order and is cheapest; on GPUs its
    atomic adds run in a varying order (two calls would differ in the last bits), so there a one-hot matrix
    product sums instead (exact products; under TF32 matmuls float32 rows get TF32 precision, like every other
    matmul of the model). one_hot forces the choice (tests).
    """
    if one_hot is None:
        one_hot = x.device.type != "cpu"
    if not one_hot:
        return x.new_zeros(*x.shape[:3], buckets, x.shape[-1]).scatter_add(3, bucket.expand_as(x), x)
    return F.one_hot(bucket.squeeze(-1), buckets).to(x.dtype).transpose(-1, -2) @ x
