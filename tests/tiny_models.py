"""Tiny random models of every registered family, for fast tests (nothing comes from the hub).

`tiny_config(model_type)` is the one small config per registered model type; `build(model_type, head)` a
seeded, eval-mode model of one head class; `tiny_model` the AutoModel-style shortcut the BERT-family tests use.
"""
from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig, AutoModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

_COMMON = dict(vocab_size=99, max_position_embeddings=64)
_BERT_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, initializer_range=0.2)
_SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, init_std=0.2, scale_embedding=True)  # fmt: skip
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
_DECODER = dict(_BERT_LIKE, num_key_value_heads=2, pad_token_id=0)  # grouped-query: 2 key heads for 4 query heads
TINY_CONFIGS: dict[str, dict] = {
    "bert": _BERT_LIKE,
    "roberta": dict(_BERT_LIKE, pad_token_id=1, max_position_embeddings=66),
    "camembert": dict(_BERT_LIKE, pad_token_id=1, max_position_embeddings=66),
    "xlm-roberta": dict(_BERT_LIKE, pad_token_id=1, max_position_embeddings=66),
    "electra": dict(_BERT_LIKE, embedding_size=16),
    "albert": dict(_BERT_LIKE, embedding_size=16),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, initializer_range=0.2),
    "bart": _SEQ2SEQ,
    "mbart": _SEQ2SEQ,
    "pegasus": _SEQ2SEQ,
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "llama": _DECODER,
    "mistral": dict(_DECODER, sliding_window=None),
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=8),
    "gte": dict(_BERT_LIKE, pad_token_id=0),
    "nomic_bert": dict(_BERT_LIKE, pad_token_id=0),
    "jina_embeddings_v3": dict(_BERT_LIKE, pad_token_id=0),
    "eurobert": dict(_DECODER, bos_token_id=1, eos_token_id=2, mask_token_id=3),
    "modernbert": dict(_BERT_LIKE, num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=16, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, cls_token_id=1, sep_token_id=2),
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
}
BERT_FAMILY = ("bert", "roberta", "camembert", "xlm-roberta", "electra")

# Unregistered transformers types that share a registered layout (converted through an inferred entry).
_UNREGISTERED_SEQ2SEQ = dict(_SEQ2SEQ, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
UNREGISTERED_CONFIGS: dict[str, dict] = {
    "ernie": dict(_BERT_LIKE, pad_token_id=0),  # BERT-like encoder
    "gemma": dict(_DECODER, head_dim=8),  # Llama-like rotary stacks
    "olmo": dict(_BERT_LIKE, pad_token_id=0),
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, initializer_range=0.2, multi_query=True, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2),  # GPT-2-like stack, one key head
    "plbart": _UNREGISTERED_SEQ2SEQ,  # BART-like: the word embedding scales itself, learned table after 2 rows
    "blenderbot": _UNREGISTERED_SEQ2SEQ,  # the same, no offset rows
    "blenderbot-small": _UNREGISTERED_SEQ2SEQ,  # the encoder scales the words (Pegasus-like), learned table
    "marian": _UNREGISTERED_SEQ2SEQ,  # the encoder scales the words, sinusoidal table
    "mvp": _UNREGISTERED_SEQ2SEQ,  # BART's paths, but an attention outside the AttentionInterface
    "m2m_100": _UNREGISTERED_SEQ2SEQ,  # BART's paths, but positions computed by a module without a table
    "switch_transformers": dict(_T5, pad_token_id=0, eos_token_id=1, num_experts=2, encoder_sparse_step=1,
                                decoder_sparse_step=1),  # T5-like, mixture-of-experts feed-forward
}


def tiny_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    """The tiny config of a registered model type (TINY_CONFIGS), with overrides."""
    return AutoConfig.for_model(model_type, **{**_COMMON, **TINY_CONFIGS[model_type], **overrides})


def head_class(model_type: str, head: str) -> type:
    """transformers' class of one head ("Model", "ForMaskedLM", ...) of a model type."""
    prefix = MODEL_MAPPING_NAMES[model_type][: -len("Model")]
    return getattr(transformers, prefix + head)


def build(model_type: str, head: str, **overrides) -> torch.nn.Module:
    """A seeded eval-mode model of one head class; causal heads get is_decoder=True."""
    causal = head in ("ForCausalLM", "LMHeadModel")
    config = tiny_config(model_type, is_decoder=causal, **overrides)
    torch.manual_seed(0)
    return head_class(model_type, head)(config).eval()


def unregistered_model(model_type: str, **overrides) -> torch.nn.Module:
    """A seeded eval-mode AutoModel of an unregistered type (UNREGISTERED_CONFIGS), with overrides."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**_COMMON, **UNREGISTERED_CONFIGS[model_type], **overrides})
    return AutoModel.from_config(config).eval()


def tiny_model(model_type: str = "bert", model_class: type = AutoModel, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded eval-mode model built by `model_class.from_config` (AutoModel by default)."""
    torch.manual_seed(seed)
    return model_class.from_config(tiny_config(model_type, **overrides)).eval()
