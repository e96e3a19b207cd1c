"""Late chunking: embed a document's chunks from one pass of the encoder over the whole document.

A chunk embedded alone loses what the document said before it. Late chunking (Günther et al. 2024) runs the
whole document through the encoder once and pools each chunk's span of token states with the model's own
pooling and normalisation. A 512-token model converted with `to_lsg(model, max_length=4096)` reads a
4096-token document in one pass; unconverted, it does late chunking inside one 512-token window.

Definitions (what the tests check against an oracle):
- The document is tokenized once without special tokens; chunks are runs of those tokens, chosen by tokens
  (`chunk_size` each), by sentences (whole sentences packed up to `chunk_size` tokens) or by character
  spans the caller gives (a chunk takes every token whose characters overlap its span).
- The model reads windows of its special tokens around at most `max_length - specials` document tokens;
  a longer document is cut into windows overlapping by `window_overlap` tokens, the last one ending at the
  document's end. Each token takes its state from the window where it lies most centred (farthest from
  that window's edges; the earlier window on a tie), so every token sees at least `window_overlap // 2`
  tokens of context on each side where the document has them.
- The leading special tokens ([CLS]) belong to every chunk holding the document's first token, the trailing
  ones ([SEP]) to every chunk holding its last token (their states from the first / last window): a
  document that is one chunk gets exactly the embedding `model.encode` gives it.
- A chunk's embedding is its token states pooled as if they were the whole sequence (cls = the chunk's first
  state, weightedmean weights 1..n over the chunk), then L2-normalised when the model normalises.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .sentence import transformer_modules

POOLING_MODES = ("cls", "lasttoken", "max", "mean", "mean_sqrt_len_tokens", "weightedmean")
CHUNK_BY = ("tokens", "sentences", "spans")
SENTENCE_MODULES = ("Transformer", "Pooling", "Normalize")
# A sentence ends after . ! ? (and closing quotes or brackets) followed by whitespace, or at a blank line.
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n\s*\n")

Span = tuple[int, int]


@dataclass(frozen=True)
class ChunkedDocument:
    """One document's chunks: `embeddings[i]` is the chunk whose characters are `text[spans[i][0]:spans[i][1]]`."""

    embeddings: torch.Tensor
    spans: list[Span]


@dataclass(frozen=True)
class _Encoder:
    """What encode_chunks needs from a model, resolved once: the transformers encoder and how it pools."""

    transformer: nn.Module
    tokenizer: Any
    pooling: tuple[str, ...]
    normalize: bool
    max_length: int


@dataclass(frozen=True)
class _Document:
    """A tokenized document: content token ids and their character offsets, the special tokens around them,
    and its chunks as [start, end) content-token ranges with their character spans."""

    ids: list[int]
    offsets: list[Span]
    prefix: list[int]
    suffix: list[int]
    token_chunks: list[Span]
    spans: list[Span]


def encode_chunks(model: nn.Module, texts: Sequence[str], chunk_size: int = 256, *, chunk_by: str = "tokens",
                  spans: Sequence[Sequence[Span]] | None = None, window_overlap: int | None = None,
                  max_length: int | None = None, tokenizer: Any = None, pooling: str | Sequence[str] | None = None,
                  normalize: bool | None = None, batch_size: int = 8,
                  show_progress_bar: bool = True) -> list[ChunkedDocument]:
    """Late-chunked embeddings of each text: one `ChunkedDocument` (embeddings, character spans) per text.

    model: a SentenceTransformer (Transformer, Pooling and optionally Normalize modules; its pooling and
    normalisation are used, so `pooling` and `normalize` must stay None), or a transformers encoder with
    `tokenizer` and `pooling` (one of POOLING_MODES or a tuple of them, concatenated; `normalize` default False).
    chunk_by: "tokens" (consecutive chunks of `chunk_size` tokens; their spans tile the text), "sentences"
    (whole sentences packed greedily up to `chunk_size` tokens, a longer sentence cut every `chunk_size`
    tokens) or "spans" (`spans[i]` lists text i's chunks as character spans, in any order, overlaps allowed).
    max_length: tokens per window, special tokens included (default: the SentenceTransformer's max_seq_length,
    or the tokenizer's model_max_length); window_overlap: tokens shared by consecutive windows of a longer
    document (default: a quarter of a window's document tokens). batch_size: windows per forward pass. A text
    with no tokens has no chunks.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}"
                         + (": wrap one text as [text]" if isinstance(texts, str) else ""))
    encoder = _resolve_encoder(model, tokenizer, pooling, normalize, max_length)
    _check_options(encoder, texts, chunk_size, chunk_by, spans, window_overlap, batch_size)
    documents = [_tokenize(encoder.tokenizer, text, chunk_size, chunk_by, spans[i] if spans is not None else None, i)
                 for i, text in enumerate(texts)]
    specials = max((len(d.prefix) + len(d.suffix) for d in documents), default=0)
    content = encoder.max_length - specials
    window_overlap = content // 4 if window_overlap is None else window_overlap
    if documents and window_overlap >= content:
        raise ValueError(f"window_overlap={window_overlap} must be below the {content} document tokens a window of "
                         f"max_length={encoder.max_length} holds besides its {specials} special tokens")
    windows = [_window_starts(len(d.ids), content, window_overlap) for d in documents]
    states = _window_states(encoder, documents, windows, content, batch_size, show_progress_bar)
    results = []
    for document, starts, window_states in zip(documents, windows, states):
        tokens = _document_states(document, starts, window_states, content)
        embeddings = [_pool(_chunk_states(tokens, document, chunk), encoder.pooling) for chunk in document.token_chunks]
        stacked = torch.stack(embeddings) if embeddings else tokens.new_zeros(0, _pooled_size(tokens, encoder))
        results.append(ChunkedDocument(F.normalize(stacked, dim=-1) if encoder.normalize else stacked,
                                       list(document.spans)))
    return results


def _resolve_encoder(model: nn.Module, tokenizer: Any, pooling: str | Sequence[str] | None, normalize: bool | None,
                     max_length: int | None) -> _Encoder:
    """The encoder, tokenizer, pooling and window length of a SentenceTransformer or a transformers model."""
    modules = transformer_modules(model)
    if modules is not None:
        if pooling is not None or normalize is not None or tokenizer is not None:
            raise ValueError("a SentenceTransformer pools, normalises and tokenizes as its modules say: leave pooling, "
                             "normalize and tokenizer as None (they are for a transformers model)")
        names = [type(module).__name__ for module in model]
        if len(modules) != 1 or names[:2] != ["Transformer", "Pooling"] or set(names[2:]) - {"Normalize"}:
            raise ValueError(f"encode_chunks knows SentenceTransformers made of Transformer, Pooling and optionally "
                             f"Normalize modules; this one has {names}")
        transformer, pooling_module = modules[0], model[1]
        if getattr(transformer, "do_lower_case", False):
            raise ValueError("the Transformer module lower-cases texts (do_lower_case=True), which can move character "
                             "offsets; encode_chunks needs spans in the text as given")
        mode = getattr(pooling_module, "pooling_mode", None)
        pooling, normalize = mode, "Normalize" in names[2:]
        auto_model, tokenizer = transformer.auto_model, transformer.tokenizer
        max_length = max_length if max_length is not None else transformer.max_seq_length
    else:
        if tokenizer is None or pooling is None:
            raise ValueError(f"a transformers model needs tokenizer= and pooling= (one of {POOLING_MODES}, or a tuple "
                             f"of them); a SentenceTransformer brings its own")
        auto_model = getattr(model, "base_model", model)
        normalize = bool(normalize)
        if max_length is None:
            max_length = min(tokenizer.model_max_length, auto_model.config.max_position_embeddings)
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling) if isinstance(pooling, (tuple, list)) else ()
    if not modes or any(mode not in POOLING_MODES for mode in modes):
        raise ValueError(f"pooling {pooling!r} is not one encode_chunks knows: use one of {POOLING_MODES} or a tuple "
                         f"of them")
    _check_encoder(auto_model)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"encode_chunks needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
    limit = auto_model.config.max_position_embeddings
    if not isinstance(max_length, int) or not 3 <= max_length <= limit:
        raise ValueError(f"max_length={max_length!r} must be an int from 3 to the model's {limit} positions")
    return _Encoder(auto_model, tokenizer, modes, normalize, max_length)


def _check_encoder(model: nn.Module) -> None:
    """Refuse what late chunking cannot use: a decoder's token states only see the past."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(f"encode_chunks needs a transformers encoder; got a {type(model).__name__} without a config")
    causal, masked = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
    decoder_only = model_type in causal and model_type not in masked
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    if encoder_decoder or getattr(config, "is_decoder", False) or decoder_only:
        raise ValueError(f"encode_chunks needs a bidirectional encoder; {model_type!r} ({type(model).__name__}) is "
                         f"{'an encoder-decoder' if encoder_decoder else 'a decoder'}: its token states do not see the "
                         f"whole document")


def _check_options(encoder: _Encoder, texts: Sequence[str], chunk_size: int, chunk_by: str,
                   spans: Sequence[Sequence[Span]] | None, window_overlap: int | None, batch_size: int) -> None:
    if chunk_by not in CHUNK_BY:
        raise ValueError(f"chunk_by={chunk_by!r}: use one of {CHUNK_BY}")
    if (chunk_by == "spans") != (spans is not None):
        raise ValueError("give spans= exactly when chunk_by='spans'" if spans is None or chunk_by == "spans"
                         else f"spans= was given with chunk_by={chunk_by!r}: set chunk_by='spans' to use them")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of tokens")
    if window_overlap is not None and (not isinstance(window_overlap, int) or window_overlap < 0):
        raise ValueError(f"window_overlap={window_overlap!r} must be a number of tokens >= 0 (or None)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive number of windows")
    if spans is not None and len(spans) != len(texts):
        raise ValueError(f"spans has {len(spans)} lists for {len(texts)} texts: give one list of spans per text")


def _tokenize(tokenizer: Any, text: str, chunk_size: int, chunk_by: str, spans: Sequence[Span] | None,
              index: int) -> _Document:
    """The text's tokens, the special tokens the tokenizer puts around them, and its chunks."""
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
                        truncation=False, verbose=False)  # no warning: longer texts are windowed
    ids, offsets, special = encoded["input_ids"], encoded["offset_mapping"], encoded["special_tokens_mask"]
    content = [i for i, flag in enumerate(special) if not flag]
    first, last = (content[0], content[-1] + 1) if content else (len(ids), len(ids))
    document_ids, document_offsets = ids[first:last], [tuple(o) for o in offsets[first:last]]
    if chunk_by == "spans":
        token_chunks, chunk_spans = _span_chunks(document_offsets, spans, len(text), index)
    else:
        cuts = _sentence_cuts(text, document_offsets) if chunk_by == "sentences" else set()
        token_chunks = _pack(len(document_ids), chunk_size, cuts)
        chunk_spans = _tiling_spans(document_offsets, token_chunks, len(text))
    return _Document(document_ids, document_offsets, ids[:first], ids[last:], token_chunks, chunk_spans)


def _pack(count: int, chunk_size: int, cuts: set[int]) -> list[Span]:
    """Consecutive token ranges of at most chunk_size tokens, each ending at the last allowed cut that fits
    (every token boundary when `cuts` is empty; otherwise a range without a cut is cut at chunk_size)."""
    chunks, start = [], 0
    while start < count:
        end = min(start + chunk_size, count)
        if cuts and end < count:
            end = max((c for c in cuts if start < c <= end), default=end)
        chunks.append((start, end))
        start = end
    return chunks


def _sentence_cuts(text: str, offsets: list[Span]) -> set[int]:
    """Token indices where a sentence starts (a sentence end is SENTENCE_END)."""
    ends = [match.end() for match in SENTENCE_END.finditer(text)]
    starts = [start for start, _ in offsets]
    return {next(i for i, s in enumerate(starts) if s >= end) for end in ends if starts and end <= starts[-1]}


def _tiling_spans(offsets: list[Span], chunks: list[Span], text_length: int) -> list[Span]:
    """Character spans of consecutive chunks that tile the text: each runs to where the next chunk's first
    token starts (the first from 0, the last to the end), so text between tokens goes to the chunk before."""
    starts = [0] + [offsets[start][0] for start, _ in chunks[1:]] + [text_length]
    return [(starts[i], starts[i + 1]) for i in range(len(chunks))]


def _span_chunks(offsets: list[Span], spans: Sequence[Span], text_length: int,
                 index: int) -> tuple[list[Span], list[Span]]:
    """Token ranges of the caller's character spans: the tokens whose characters overlap the span."""
    chunks = []
    for span in spans:
        if (not isinstance(span, (tuple, list)) or len(span) != 2 or not all(isinstance(x, int) for x in span)
                or not 0 <= span[0] < span[1] <= text_length):
            raise ValueError(f"span {span!r} of text {index} must be (start, end) with 0 <= start < end <= "
                             f"{text_length} (the text's length)")
        inside = [i for i, (start, end) in enumerate(offsets) if start < span[1] and span[0] < end]
        if not inside:
            raise ValueError(f"span {tuple(span)} of text {index} holds no token (only whitespace or nothing): "
                             f"it has no token states to pool")
        chunks.append((inside[0], inside[-1] + 1))
    return chunks, [tuple(span) for span in spans]


def _window_starts(count: int, content: int, overlap: int) -> list[int]:
    """First document token of each window: every content - overlap tokens, the last window ending at the end."""
    if count <= content:
        return [0]
    step = content - overlap
    starts = list(range(0, count - content, step))
    return starts + [count - content]


def _window_states(encoder: _Encoder, documents: list[_Document], windows: list[list[int]], content: int,
                   batch_size: int, show_progress_bar: bool) -> list[list[torch.Tensor]]:
    """Per document, the last hidden states of each of its windows (special tokens included). The windows of
    all documents are batched longest first, so a batch pads little."""
    from tqdm.auto import tqdm

    inputs = [(d, w, document.prefix + document.ids[start: start + content] + document.suffix)
              for d, (document, starts) in enumerate(zip(documents, windows)) for w, start in enumerate(starts)]
    out: list[list[torch.Tensor]] = [[None] * len(starts) for starts in windows]  # type: ignore[list-item]
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][2]))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    pad_id = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else 0
    device = next(encoder.transformer.parameters()).device
    with torch.no_grad():  # not inference_mode: callers may feed the embeddings to autograd
        for batch in tqdm(batches, desc="late chunking", unit="batch", disable=not show_progress_bar):
            width = len(inputs[batch[0]][2])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                sequence = inputs[i][2]
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            hidden = encoder.transformer(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for row, i in enumerate(batch):
                d, w, sequence = inputs[i]
                out[d][w] = hidden[row, : len(sequence)]
    return out


def _document_states(document: _Document, starts: list[int], window_states: list[torch.Tensor],
                     content: int) -> torch.Tensor:
    """[prefix states of the first window; each document token's state from the window where it lies most
    centred; suffix states of the last window]."""
    prefix, count = len(document.prefix), len(document.ids)
    if len(starts) == 1:
        return window_states[0]
    stacked = torch.stack(window_states)  # every window of a multi-window document is full
    tokens = torch.arange(count)
    offsets = tokens[:, None] - torch.tensor(starts)[None, :]  # token's place in each window
    margins = torch.minimum(offsets, content - 1 - offsets).masked_fill((offsets < 0) | (offsets >= content), -1)
    owners = margins.argmax(1)  # the first window on a tie
    middle = stacked[owners, prefix + offsets[tokens, owners]]
    return torch.cat([stacked[0, :prefix], middle, stacked[-1, prefix + content:]])


def _chunk_states(tokens: torch.Tensor, document: _Document, chunk: Span) -> torch.Tensor:
    """A chunk's rows of the document's states, with the leading / trailing special tokens' rows when the
    chunk holds the document's first / last token."""
    prefix, start, end = len(document.prefix), chunk[0], chunk[1]
    first = 0 if start == 0 else prefix + start
    last = tokens.shape[0] if end == len(document.ids) else prefix + end
    return tokens[first:last]


POOLERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cls": lambda states: states[0],
    "lasttoken": lambda states: states[-1],
    "max": lambda states: states.max(0).values,
    "mean": lambda states: states.mean(0),
    "mean_sqrt_len_tokens": lambda states: states.sum(0) / states.shape[0] ** 0.5,
    "weightedmean": lambda states: (states * torch.arange(1, states.shape[0] + 1, dtype=states.dtype,
                                                          device=states.device)[:, None]).sum(0)
    / (states.shape[0] * (states.shape[0] + 1) / 2),
}


def _pool(states: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """The chunk's states pooled by each mode, concatenated in the order given (as sentence-transformers does)."""
    return torch.cat([POOLERS[mode](states) for mode in modes])


def _pooled_size(tokens: torch.Tensor, encoder: _Encoder) -> int:
    return tokens.shape[-1] * len(encoder.pooling)
