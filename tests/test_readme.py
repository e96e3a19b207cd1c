"""The README runs as written: every ```python block, each on its own (fresh globals, so a name taken from an
earlier block fails), in a fresh interpreter whose working directory holds offline stand-ins for the hub names
the blocks use: tiny random models saved at "path/to/roberta", "path/to/llama" and "path/to/plain-bert" (with
the shipped MiniLM's tokenizer where a block tokenizes) and the shipped all-MiniLM-L6-v2 at "all-MiniLM-L6-v2".
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, RobertaConfig
from transformers import RobertaForSequenceClassification

from tests.helpers import minilm_folder

ROOT = Path(__file__).resolve().parent.parent
HUB_NAMES = {"path/to/roberta", "path/to/llama", "path/to/plain-bert", "all-MiniLM-L6-v2"}
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

# Runs each block with fresh globals; says which block failed and how.
RUNNER = """
import json, sys, traceback
for index, code in enumerate(json.load(open(sys.argv[1]))):
    try:
        exec(compile(code, f"README python block {index + 1}", "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"README python block {index + 1} failed:\\n{code}\\n{traceback.format_exc()}", file=sys.stderr)
        sys.exit(1)
"""


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def write_stand_ins(folder: Path) -> None:
    """Tiny random models under the hub names the README uses (nothing comes from the hub)."""
    pytest.importorskip("sentence_transformers", reason="the README's sentence-transformers block needs it")
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    roberta = RobertaForSequenceClassification(RobertaConfig(vocab_size=tokenizer.vocab_size, pad_token_id=1,
                                                             max_position_embeddings=514, **TINY))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id, **TINY))
    roberta.save_pretrained(folder / "path/to/roberta")
    tokenizer.save_pretrained(folder / "path/to/roberta")
    llama.save_pretrained(folder / "path/to/llama")
    tokenizer.save_pretrained(folder / "path/to/llama")
    config = folder / "path/to/llama" / "tokenizer_config.json"  # as a decoder's tokenizer: no token types
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_input_names": ["input_ids", "attention_mask"]}))
    BertModel(BertConfig(vocab_size=99, max_position_embeddings=64, **TINY)).save_pretrained(folder / "path/to/plain-bert")
    shutil.copytree(minilm_folder(), folder / "all-MiniLM-L6-v2")


def test_the_readme_uses_only_names_the_test_stands_in_for() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 7
    used = {name for block in blocks for name in re.findall(r'from_pretrained\("([^"]+)"\)|SentenceTransformer\("([^"]+)"\)',
                                                             block) for name in name if name}
    written = {"roberta-lsg-4096", "minilm-lsg", "minilm-onnx"}  # folders the blocks save themselves
    assert used - written <= HUB_NAMES, f"hub names without an offline stand-in: {used - written - HUB_NAMES}"


def test_every_python_block_of_the_readme_runs_on_its_own(tmp_path: Path) -> None:
    write_stand_ins(tmp_path)
    (tmp_path / "blocks.json").write_text(json.dumps(python_blocks()))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", RUNNER, "blocks.json"], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "roberta-lsg-4096" / "config.json").exists() and (tmp_path / "pattern.png").exists()


def test_the_help_the_readme_promises() -> None:
    """`lsg-patch --help` lists the commands; `convert --help` documents every LSG option and conversion flag."""
    from lsg_patch.cli import build_parser
    from lsg_patch.config import option_names

    parser = build_parser()
    top = parser.format_help()
    assert all(command in top for command in ("convert", "info", "run"))
    convert = parser._subparsers._group_actions[0].choices["convert"].format_help()
    flags = [f"--{name.replace('_', '-')}" for name in option_names()]
    flags += ["--random-global-init", "--global-positional-stride", "--keep-first-global-token", "--dtype", "--lsg"]
    missing = [flag for flag in flags if flag not in convert]
    assert not missing, f"convert --help does not document {missing}"
