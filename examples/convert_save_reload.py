"""Convert a model, save it, and load it back as an LSG model; then undo the patch.

The saved folder is an ordinary transformers checkpoint whose config carries the LSG settings; loading it
inside `lsg_patch.enabled()` rebuilds the LSG model with its trained global tokens and long position table.

    python examples/convert_save_reload.py --model path/to/model --out model-lsg-4096 --max-length 4096
    python examples/convert_save_reload.py --tiny --out /tmp/tiny-lsg      # tiny random model, offline
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
from transformers import AutoModel, AutoTokenizer

import lsg_patch


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-base", help="checkpoint folder or hub name")
    parser.add_argument("--out", default=None, help="folder to save the LSG model to (default: a temporary one, "
                        "removed at the end)")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (offline)")
    args = parser.parse_args(argv)

    if args.tiny:
        from _tiny import tiny_model

        model, tokenizer = tiny_model(AutoModel)
        max_length, block_size = 1024, 32
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModel.from_pretrained(args.model).eval()
        max_length, block_size = args.max_length, 128
    with contextlib.ExitStack() as stack:
        out = args.out or stack.enter_context(tempfile.TemporaryDirectory(prefix="lsg-"))
        return _convert_save_reload(model, tokenizer, max_length, block_size, out)


def _convert_save_reload(model, tokenizer, max_length: int, block_size: int, out: str) -> float:
    lsg_patch.to_lsg(model, max_length=max_length, tokenizer=tokenizer, block_size=block_size,
                     sparse_block_size=block_size, sparsity_type="bos_pooling", num_global_tokens=2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out}: max_position_embeddings={model.config.max_position_embeddings}, "
          f"block_size={model.config.block_size}, sparsity_type={model.config.sparsity_type}")  # fmt: skip

    with lsg_patch.enabled():
        reloaded = AutoModel.from_pretrained(out).eval()
    batch = tokenizer("a long document " * (max_length // 4), truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        difference = (model(**batch).last_hidden_state - reloaded(**batch).last_hidden_state).abs().max().item()
    print(f"reloaded is LSG: {lsg_patch.is_lsg_model(reloaded)}; largest output difference on "
          f"{batch['input_ids'].shape[1]} tokens: {difference:.2e}")  # fmt: skip

    lsg_patch.from_lsg(reloaded)
    print(f"after from_lsg: is LSG {lsg_patch.is_lsg_model(reloaded)}, "
          f"max_position_embeddings={reloaded.config.max_position_embeddings}")  # fmt: skip
    return difference


if __name__ == "__main__":
    main()
