"""Generate after a long prompt with causal LSG and its constant-size cache.

    python examples/generate_long.py                    # a small random Llama, 8192-token prompt, 32 new tokens
    python examples/generate_long.py --tiny             # seconds: a tiny model and a 2048-token prompt

No decoder checkpoint is available offline on this machine, so the model has random weights: the output tokens mean
nothing, the point is the cache. `generate` runs as usual; lsg_patch replaces its empty DynamicCache by an LSGCache,
which keeps, per layer, the global tokens, the last two blocks of tokens and the sparse items before them: its size
does not depend on the prompt. The dense cache of the unconverted model is measured on the same prompt.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lsg_patch


def cache_bytes(cache) -> int:
    """Bytes held by an LSGCache (it counts them) or by transformers' DynamicCache (its keys and values)."""
    if isinstance(cache, lsg_patch.LSGCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def returned_cache(output):
    """The cache a forward returned: `cache` from transformers 5.24 on, `past_key_values` before."""
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def build(tiny: bool) -> LlamaForCausalLM:
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if tiny else \
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    config = LlamaConfig(**sizes, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=16384)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a 2048-token prompt")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 8192; 2048 with --tiny)")
    parser.add_argument("--new", type=int, default=32, help="tokens to generate")
    args = parser.parse_args(argv)
    length = args.prompt or (2048 if args.tiny else 8192)
    prompt = torch.randint(5, 32000, (1, length), generator=torch.Generator().manual_seed(0))

    plain = build(args.tiny)
    with torch.no_grad():
        dense = cache_bytes(returned_cache(plain(prompt, use_cache=True)))
    model = lsg_patch.to_lsg(plain, max_length=length + args.new, block_size=128, sparse_block_size=128,
                             sparsity_factor=2, sparsity_type="norm")
    with torch.no_grad():
        start = time.perf_counter()
        output = model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                pad_token_id=0, return_dict_in_generate=True)
        seconds = time.perf_counter() - start
    cache = returned_cache(output)
    ours = cache_bytes(cache)
    print(f"generated {args.new} tokens after a {length}-token prompt in {seconds:.1f} s")
    print(f"{type(cache).__name__}: {ours / 2**20:.2f} MiB; the dense cache after the prompt alone: "
          f"{dense / 2**20:.2f} MiB ({ours / dense:.1%})")
    return {"tokens": output.sequences[0, length:], "lsg_bytes": ours, "dense_bytes": dense}


if __name__ == "__main__":
    main()
