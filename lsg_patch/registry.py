"""The architecture registry: for each model_type, where LSG plugs in, as data.

An entry names module paths relative to the base model (`model.base_model`), how the position table
is stored, how the global tokens are seeded, and the family adapter that carries the forward-time
behaviour (a FamilyAdapter, whose interface is defined here). Users add architectures with `register()`;
nothing here touches tensors. Finding a model's entry (registered or inferred) and checking that it fits the
model is the resolver's job: lsg_patch.architecture_inference.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .config import LSGConfig

class FamilyAdapter(ABC):
    """The forward-time behaviour of one family, installed as LSGHooks on the host modules: global tokens in,
    block padding, the per-call LSG state, trimmed outputs. The attention modules themselves stay the host's.
    An ArchitectureEntry names its adapter; the implementations are in lsg_patch.families."""

    @abstractmethod
    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        """Register the hooks that prepend global tokens, pad to blocks, build the mask and trim outputs."""

    def remove(self, base_model: nn.Module, entry: "ArchitectureEntry") -> None:
        """Undo what install_hooks changed besides its LSGHooks (which the conversion removes by their handles);
        most families change nothing else."""


POSITION_KINDS = ("learned", "sinusoidal", "rotary", "relative_bias", "none")
TABLELESS_POSITION_KINDS = ("rotary", "relative_bias", "none")


@dataclass(frozen=True)
class ArchitectureEntry:
    """How one model_type is patched. Paths are relative to the base model; "*" matches any child name.

    adapter: a FamilyAdapter subclass, or its import path "package.module:ClassName".
    word_embeddings / token_type_embeddings: the tables that seed the global tokens (token types only for
    families whose global init adds token_type[0], as the reference does for BERT, ELECTRA and ALBERT).
    global_embeddings_parent: the module that receives `global_embeddings` (a 512-row nn.Embedding).
    position_kind: how positions work (POSITION_KINDS): "learned" tables are tiled to max_length, "sinusoidal"
    ones regenerated; "rotary", "relative_bias" (T5's bucketed bias added to the scores) and "none" have no table
    to grow. position_embeddings names the table (None for the kinds without one).
    position_offset: leading rows of the position table that are not positions (2 for RoBERTa and BART).
    tied_position_tables: other tables that share max_position_embeddings and grow with the main one.
    keep_sliding_window_layers: attention modules with a `sliding_window` keep their own windowed attention
    (run as "lsg_sliding": banded, linear in length, over [globals; tokens]) and LSG runs in the others
    (ModernBERT's global layers).
    """

    adapter: type[FamilyAdapter] | str
    self_attention: str
    position_embeddings: str | None
    word_embeddings: str
    embeddings: str = "embeddings"
    encoder: str = "encoder"
    global_embeddings_parent: str = "embeddings"
    token_type_embeddings: str | None = None
    position_kind: str = "learned"
    position_offset: int = 0
    tied_position_tables: tuple[str, ...] = ()
    keep_sliding_window_layers: bool = False
    encoder_decoder: bool = False
    description: str = ""
    heads: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.position_kind not in POSITION_KINDS:
            raise ValueError(f"position_kind={self.position_kind!r} is not accepted; choose one of {', '.join(POSITION_KINDS)}")
        if (self.position_embeddings is None) != (self.position_kind in TABLELESS_POSITION_KINDS):
            raise ValueError(
                f"position_kind={self.position_kind!r} {'has no' if self.position_kind in TABLELESS_POSITION_KINDS else 'needs a'} "
                f"position table, but position_embeddings={self.position_embeddings!r}"
            )

    @property
    def has_position_table(self) -> bool:
        return self.position_embeddings is not None

    def adapter_instance(self, model_type: str) -> FamilyAdapter:
        adapter = _resolve_adapter(model_type, self.adapter)
        return adapter()

    def module_paths(self) -> dict[str, str]:
        """Every module path the entry names, by field name (for validation and error messages)."""
        paths = {
            "embeddings": self.embeddings,
            "encoder": self.encoder,
            "self_attention": self.self_attention,
            "word_embeddings": self.word_embeddings,
            "global_embeddings_parent": self.global_embeddings_parent,
        }
        if self.position_embeddings is not None:
            paths["position_embeddings"] = self.position_embeddings
        if self.token_type_embeddings:
            paths["token_type_embeddings"] = self.token_type_embeddings
        for index, path in enumerate(self.tied_position_tables):
            paths[f"tied_position_tables[{index}]"] = path
        return paths


_BERT_HEADS = (
    "Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
    "ForMultipleChoice", "ForPreTraining", "ForCausalLM",
)  # fmt: skip
_ROBERTA_HEADS = tuple(head for head in _BERT_HEADS if head != "ForPreTraining")
# BERT itself names its causal head LMHeadModel and has a next-sentence head; RoBERTa-likes have no pre-training head.
_BERT_CLASS_HEADS = (*_ROBERTA_HEADS[:-1], "ForPreTraining", "ForNextSentencePrediction", "LMHeadModel")


def bert_like_entry(offset: int, token_types: bool, description: str = "", heads: tuple[str, ...] = _BERT_HEADS
                    ) -> ArchitectureEntry:
    """BERT's layout: `embeddings`, `encoder.layer.*.attention.self`, a learned table after `offset` rows."""
    return ArchitectureEntry(
        adapter="lsg_patch.families.bert:BertFamily",
        self_attention="encoder.layer.*.attention.self",
        position_embeddings="embeddings.position_embeddings",
        word_embeddings="embeddings.word_embeddings",
        token_type_embeddings="embeddings.token_type_embeddings" if token_types else None,
        position_offset=offset,
        description=description,
        heads=heads,
    )


# The decoder-only ForCausalLM heads of these families have no encoder, so nothing for LSG to patch.
_SEQ2SEQ_HEADS = ("Model", "ForConditionalGeneration", "ForSequenceClassification", "ForQuestionAnswering")


def bart_like_entry(
    adapter: str, offset: int, sinusoidal: bool, heads: tuple[str, ...], description: str
) -> ArchitectureEntry:
    """BART's layout: `shared` words, `encoder.layers.*.self_attn`, encoder and decoder position tables."""
    return ArchitectureEntry(
        adapter=adapter,
        self_attention="encoder.layers.*.self_attn",
        position_embeddings="encoder.embed_positions",
        word_embeddings="shared",
        embeddings="encoder",
        global_embeddings_parent="encoder",
        position_kind="sinusoidal" if sinusoidal else "learned",
        position_offset=offset,
        tied_position_tables=("decoder.embed_positions",),
        encoder_decoder=True,
        description=description,
        heads=heads,
    )


# Entries shared by several model types (frozen dataclasses, so sharing is safe).
_ROBERTA_LIKE = bert_like_entry(
    2, False, "encoder self-attention; learned positions tiled after the 2 offset rows", _ROBERTA_HEADS
)
_BART_LIKE = bart_like_entry(
    "lsg_patch.families.bart:BartFamily", 2, False, _SEQ2SEQ_HEADS,
    "encoder self-attention only (decoder self- and cross-attention unchanged); encoder and decoder learned "
    "positions tiled after the 2 offset rows; global tokens passed to the decoder's cross-attention "
    "(pass_global_tokens_to_decoder); mBART's final encoder.layer_norm also covers the global rows",
)  # fmt: skip

_DECODER_HEADS = ("Model", "ForCausalLM", "ForSequenceClassification", "ForQuestionAnswering", "ForTokenClassification")


# Llama-like decoder stacks: `embed_tokens`, `layers.*.self_attn`, rotary positions applied inside the attention.
ROTARY_DECODER = ArchitectureEntry(
    adapter="lsg_patch.families.stack:StackFamily",
    self_attention="layers.*.self_attn",
    position_embeddings=None,
    word_embeddings="embed_tokens",
    embeddings="embed_tokens",
    encoder="",
    global_embeddings_parent="",
    position_kind="rotary",
    description="causal self-attention, grouped-query keys, constant-size LSGCache for generate; global tokens "
    "a prefix at positions 0..G-1 (rotary scores between tokens unchanged); Mistral's sliding window is replaced by "
    "LSG's local window",
    heads=_DECODER_HEADS,
)


_ENCODER_HEADS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
_ROTARY_ENCODER_NOTE = ("bidirectional self-attention; global tokens a prefix at positions 0..G-1 (rotary scores "
                        "between tokens unchanged)")  # fmt: skip


# GTE-like encoders: the rotary stack behind an `embeddings` module (word and token-type vectors, LayerNorm).
ROTARY_ENCODER = replace(
    ROTARY_DECODER, word_embeddings="embeddings.word_embeddings", embeddings="embeddings", heads=_ENCODER_HEADS,
    description=_ROTARY_ENCODER_NOTE + "; the global rows get the embeddings' token type 0 and LayerNorm",
)  # fmt: skip
# GPT-2's layout: `wte`, `wpe` (learned), `h.*.attn`.
GPT2_LIKE = ArchitectureEntry(
    adapter="lsg_patch.families.stack:StackFamily",
    self_attention="h.*.attn",
    position_embeddings="wpe",
    word_embeddings="wte",
    embeddings="wte",
    encoder="",
    global_embeddings_parent="",
    description="causal self-attention, constant-size LSGCache for generate; learned positions tiled; global tokens a prefix "
    "without position",
    heads=("Model", "LMHeadModel", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"),
)
T5_LIKE = ArchitectureEntry(
    adapter="lsg_patch.families.t5:T5Family",
    self_attention="encoder.block.*.layer.0.SelfAttention",
    position_embeddings=None,
    word_embeddings="encoder.embed_tokens",
    embeddings="encoder",
    global_embeddings_parent="encoder",
    position_kind="relative_bias",
    encoder_decoder=True,
    description="encoder self-attention only (decoder self- and cross-attention unchanged); the relative position "
    "bias applied inside every LSG key set, never as a dense (n, n) tensor; global tokens without position (no "
    "bias) passed to the decoder's cross-attention (pass_global_tokens_to_decoder), dropped by EncoderModel",
    heads=("Model", "ForConditionalGeneration", "EncoderModel", "ForSequenceClassification", "ForTokenClassification",
           "ForQuestionAnswering"),
)
# ALBERT's layout: one attention module per layer group, globals and block padding at embedding_size.
ALBERT_LIKE = ArchitectureEntry(
    adapter="lsg_patch.families.albert:AlbertFamily",
    self_attention="encoder.albert_layer_groups.*.albert_layers.*.attention",
    position_embeddings="embeddings.position_embeddings",
    word_embeddings="embeddings.word_embeddings",
    token_type_embeddings="embeddings.token_type_embeddings",
    description="shared attention (the one module of each layer group runs LSG for all its layers); learned "
    "positions tiled; globals and block padding at embedding_size, before embedding_hidden_mapping_in",
    heads=(
        "Model", "ForPreTraining", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
        "ForQuestionAnswering", "ForMultipleChoice",
    ),
)
# DistilBERT's layout: self-attention under `transformer`.
DISTILBERT_LIKE = ArchitectureEntry(
    adapter="lsg_patch.families.bert:BertFamily",  # same hooks, on `transformer`
    self_attention="transformer.layer.*.attention",
    position_embeddings="embeddings.position_embeddings",
    word_embeddings="embeddings.word_embeddings",
    encoder="transformer",
    description="`transformer` self-attention; learned positions tiled",
    heads=(
        "Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
        "ForMultipleChoice",
    ),
)
# ModernBERT's layout: a rotary encoder whose sliding-window layers keep their own window.
MODERNBERT_LIKE = replace(
    ROTARY_ENCODER, self_attention="layers.*.attn", word_embeddings="embeddings.tok_embeddings",
    keep_sliding_window_layers=True,
    heads=(*_ENCODER_HEADS, "ForQuestionAnswering", "ForMultipleChoice"),
    description=_ROTARY_ENCODER_NOTE + "; LSG in the global-attention layers, the sliding-window layers keep "
    "their own window (over [globals; tokens], padding masked), computed banded in linear memory, never as a "
    "dense (n, n) mask",
)  # fmt: skip
_REGISTRY: dict[str, ArchitectureEntry] = {
    "bert": bert_like_entry(0, True, "encoder self-attention (LMHeadModel, is_decoder=True: causal, with the LSGCache); "
                       "learned positions tiled", _BERT_CLASS_HEADS),
    "roberta": _ROBERTA_LIKE,
    "camembert": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "electra": bert_like_entry(0, True, "encoder self-attention; learned positions tiled; global tokens at embedding_size, "
                          "before embeddings_project"),
    "albert": ALBERT_LIKE,
    "distilbert": DISTILBERT_LIKE,
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
    "pegasus": bart_like_entry(
        "lsg_patch.families.bart:PegasusFamily", 0, True, _SEQ2SEQ_HEADS[:2],
        "encoder self-attention only; encoder and decoder sinusoidal tables regenerated; global tokens passed to "
        "the decoder",
    ),  # fmt: skip
    "gpt2": GPT2_LIKE,
    "llama": ROTARY_DECODER,
    "mistral": ROTARY_DECODER,
    "qwen2": ROTARY_DECODER,
    "qwen3": ROTARY_DECODER,
    "gte": ROTARY_ENCODER,
    "nomic_bert": ROTARY_ENCODER,
    "jina_embeddings_v3": replace(ROTARY_ENCODER, heads=(*_ENCODER_HEADS, "ForQuestionAnswering")),
    "eurobert": replace(ROTARY_DECODER, description=_ROTARY_ENCODER_NOTE, heads=_ENCODER_HEADS),
    "modernbert": MODERNBERT_LIKE,
    "t5": T5_LIKE,
    "mt5": T5_LIKE,
    "umt5": replace(T5_LIKE, adapter="lsg_patch.families.t5:UMT5Family", description=T5_LIKE.description.replace(
        "the relative position bias", "every layer's relative position bias")),
}


# Model types whose attention cannot take LSG, with the reason `to_lsg` gives.
CANNOT_SUPPORT: dict[str, str] = {
    "deberta": "its disentangled attention adds content-to-position and position-to-content scores from relative "
    "position embeddings inside its own attention code, which LSG's key sets cannot reproduce",
    "deberta-v2": "its disentangled attention adds content-to-position and position-to-content scores from "
    "relative position embeddings inside its own attention code, which LSG's key sets cannot reproduce",
    "longformer": "it already runs its own sparse attention (sliding window plus global tokens); convert the "
    "RoBERTa-like model it was made from instead",
    "led": "the Longformer Encoder-Decoder already runs its own sparse attention; convert the BART model it was "
    "made from instead",
    "big_bird": "it already runs its own block-sparse attention (window, random and global blocks)",
    "bigbird_pegasus": "it already runs its own block-sparse attention (window, random and global blocks)",
    "longt5": "it already runs its own local or transient-global attention",
}


def register(model_type: str, entry: ArchitectureEntry, *, replace_existing: bool = False) -> None:
    """Add (or, with replace_existing=True, replace) the entry of `model_type`.

    The adapter path is imported now, so a wrong path fails here with the entry and path named;
    module paths are checked against the model at `to_lsg` time.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type={model_type!r} is not accepted: give the config's model_type string")
    if not isinstance(entry, ArchitectureEntry):
        raise TypeError(f"register({model_type!r}, ...) needs an ArchitectureEntry, got {type(entry).__name__}")
    if model_type in _REGISTRY and not replace_existing:
        raise ValueError(f"{model_type!r} is already registered; pass replace_existing=True to replace its entry")
    _resolve_adapter(model_type, entry.adapter)
    _REGISTRY[model_type] = entry


def unregister(model_type: str) -> None:
    """Remove a registered entry (built-in ones included)."""
    if model_type not in _REGISTRY:
        raise KeyError(f"{model_type!r} is not registered; registered: {', '.join(sorted(_REGISTRY))}")
    del _REGISTRY[model_type]


def supported_architectures() -> dict[str, ArchitectureEntry]:
    """A copy of the registry: model_type -> entry. Types it does not name may still be inferred from a loaded
    model's modules: `architecture_support(model)` (lsg_patch.architecture_inference) says which applies."""
    return dict(_REGISTRY)


def markdown_table() -> str:
    """The README's table of supported architectures, from the registry (model types sharing an entry share a
    row); tests/test_registry.py fails when the README's copy differs."""
    groups: dict[int, list[str]] = {}
    for model_type, entry in _REGISTRY.items():
        groups.setdefault(id(entry), []).append(model_type)
    lines = ["| model type | positions | heads | what is patched |", "|---|---|---|---|"]
    for types in groups.values():
        entry = _REGISTRY[types[0]]
        lines.append(f"| {', '.join(f'`{t}`' for t in types)} | {entry.position_kind} | {', '.join(entry.heads)} | "
                     f"{entry.description} |")
    lines += ["", "Refused, with the reason (`to_lsg` raises before changing anything):", "",
              "| model type | why LSG cannot run there |", "|---|---|"]
    lines += [f"| `{t}` | {reason} |" for t, reason in CANNOT_SUPPORT.items()]
    return "\n".join(lines)


def with_changes(entry: ArchitectureEntry, **changes: Any) -> ArchitectureEntry:
    """A copy of an entry with some fields changed (to register a close relative of a built-in)."""
    return replace(entry, **changes)


def _resolve_adapter(model_type: str, adapter: type[FamilyAdapter] | str) -> type[FamilyAdapter]:
    if isinstance(adapter, str):
        module_name, _, attribute = adapter.partition(":")
        try:
            resolved = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(
                f"registry entry {model_type!r}: adapter path {adapter!r} cannot be imported ({error}); "
                "give 'package.module:ClassName' of a FamilyAdapter subclass"
            ) from None
        adapter = resolved
    if not (isinstance(adapter, type) and issubclass(adapter, FamilyAdapter)):
        raise ValueError(f"registry entry {model_type!r}: adapter {adapter!r} is not a FamilyAdapter subclass")
    return adapter


def __getattr__(name: str) -> Any:
    """Import aliases: the resolver (`entry_for`, `architecture_support`) moved to lsg_patch.architecture_inference, which builds
    on this table (imported on first use, so this module imports nothing that imports it)."""
    if name in ("entry_for", "architecture_support"):
        from . import architecture_inference

        return getattr(architecture_inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
