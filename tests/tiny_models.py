"""Tiny random models of the BERT family for fast tests."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, initializer_range=0.2)  # fmt: skip
BERT_FAMILY = ("bert", "roberta", "camembert", "xlm-roberta", "electra")


def tiny_config(model_type: str, **overrides):
    values = dict(TINY, **overrides)
    if model_type in ("roberta", "camembert", "xlm-roberta"):
        values.setdefault("pad_token_id", 1)
        values["max_position_embeddings"] = values["max_position_embeddings"] + 2
    if model_type == "electra":
        values.setdefault("embedding_size", 16)
    return AutoConfig.for_model(model_type, **values)


def tiny_model(model_type: str = "bert", model_class=AutoModel, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return model_class.from_config(tiny_config(model_type, **overrides)).eval()
