"""Document and query embeddings for every method: the unconverted model on truncated inputs or on chunks,
and LSG-converted copies on whole documents. Mean pooling then L2 normalisation, as sentence-transformers
does for all-MiniLM-L6-v2, so the zero-shot numbers are the model's own embeddings."""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

import lsg_patch
from lsg_patch.demo import mean_pool, minilm_path

MAX_LENGTH = 4096
SPARSITY_TYPES = ("none", "norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling")
LSG_VARIANTS: dict[str, dict] = {
    **{f"lsg-{kind}": {"sparsity_type": kind} for kind in SPARSITY_TYPES},
    "lsg-norm-maskfirst": {"sparsity_type": "norm", "mask_first_token": True},
    "lsg-norm-block64": {"sparsity_type": "norm", "block_size": 64, "sparse_block_size": 64},
}
CHUNK_SIZES = (256, 512)


def load_base(quick: bool) -> tuple[torch.nn.Module, object]:
    """all-MiniLM-L6-v2 as shipped (offline), or for --quick a random 2-layer BERT of its vocabulary,
    which exercises every code path in seconds (its scores mean nothing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    if not quick:
        return AutoModel.from_pretrained(minilm_path()).eval(), tokenizer
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=tokenizer.vocab_size, max_position_embeddings=512,
                                  hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return AutoModel.from_config(config).eval(), tokenizer


def to_lsg_copy(base: torch.nn.Module, tokenizer, options: dict) -> torch.nn.Module:
    """A converted deep copy: every variant starts from the same pretrained weights."""
    return lsg_patch.to_lsg(copy.deepcopy(base), max_length=MAX_LENGTH, tokenizer=tokenizer, **options)


def encode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean-pooled embeddings of one padded batch (gradients flow when enabled)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(mean_pool(hidden, attention_mask), dim=-1)


def pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


def length_batches(lengths: Sequence[int], tokens_per_batch: int) -> Iterator[list[int]]:
    """Indices grouped by similar length, each group at most tokens_per_batch padded tokens: padding a short
    document to a long one would cost as much as the long one."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for index in order:
        if batch and lengths[index] * (len(batch) + 1) > tokens_per_batch:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def embed_sequences(model: torch.nn.Module, sequences: Sequence[list[int]], pad_id: int,
                    tokens_per_batch: int = 8192) -> torch.Tensor:
    """Embeddings of token-id sequences (special tokens included), in the input order, without gradients."""
    out = torch.empty(len(sequences), model.config.hidden_size)
    with torch.no_grad():
        for batch in length_batches([len(s) for s in sequences], tokens_per_batch):
            out[batch] = encode(model, *pad([sequences[i] for i in batch], pad_id))
    return out


def with_specials(tokenizer, ids: list[int]) -> list[int]:
    return [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (chunking adds them per chunk)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def chunk(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive pieces of size - 2 tokens, so each piece plus [CLS]/[SEP] fills `size` positions."""
    step = size - 2
    return [ids[start: start + step] for start in range(0, max(len(ids), 1), step)]


def chunk_embeddings(model: torch.nn.Module, tokenizer, documents: Sequence[list[int]],
                     size: int) -> tuple[list[torch.Tensor], float, float]:
    """Per document, the embeddings of its chunks of `size` tokens; with the seconds the first chunks took
    (= truncation to `size`) and the seconds all chunks took (= chunk methods)."""
    pieces = [[with_specials(tokenizer, piece) for piece in chunk(ids, size)] for ids in documents]
    start = time.perf_counter()
    first = embed_sequences(model, [p[0] for p in pieces], tokenizer.pad_token_id)
    first_s = time.perf_counter() - start
    rest = [piece for p in pieces for piece in p[1:]]
    rest_embeddings = embed_sequences(model, rest, tokenizer.pad_token_id) if rest else first[:0]
    all_s = time.perf_counter() - start
    out, offset = [], 0
    for row, p in enumerate(pieces):
        out.append(torch.cat([first[row: row + 1], rest_embeddings[offset: offset + len(p) - 1]]))
        offset += len(p) - 1
    return out, first_s, all_s


def whole_embeddings(model: torch.nn.Module, tokenizer, documents: Sequence[list[int]]) -> tuple[torch.Tensor, float]:
    """One embedding per whole document (an LSG model), and the seconds it took."""
    start = time.perf_counter()
    embeddings = embed_sequences(model, [with_specials(tokenizer, ids) for ids in documents], tokenizer.pad_token_id)
    return embeddings, time.perf_counter() - start


def query_embeddings(model: torch.nn.Module, tokenizer, queries: Sequence[str]) -> torch.Tensor:
    return embed_sequences(model, [with_specials(tokenizer, ids) for ids in token_ids(tokenizer, queries)],
                           tokenizer.pad_token_id)


def best_chunk_scores(queries: torch.Tensor, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """queries x documents: the best cosine between the query and any chunk of the document."""
    return torch.stack([(queries @ c.T).max(1).values for c in chunks], dim=1)


def chunk_mean(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """One normalised vector per document: the mean of its chunk embeddings."""
    return F.normalize(torch.stack([c.mean(0) for c in chunks]), dim=-1)
