"""The conversion API's contracts (issue 19): one options object on every path, re-configuration keeps what is not
given and validates what is, a conversion changes its own model only, from_lsg undoes what to_lsg did (on what
to_lsg takes, tokenizer included), the CLI and enabled() behave as to_lsg does, clear errors for absurd input, the
resolver's checks are to_lsg's, and the package has no import cycle."""
from __future__ import annotations

import ast
import copy
import inspect
import io
import json
import logging
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, BertModel

import lsg_patch
from lsg_patch.cli import main
from lsg_patch.config import has_lsg_settings, option_names
from lsg_patch.demo import PARAGRAPH, minilm_path
from lsg_patch.hooks import LSGHook
from lsg_patch.moved_modules import MOVED_MODULES
from tests.tiny_models import tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(block_size=16, sparse_block_size=16)
LONG = PARAGRAPH * 20  # about 1200 MiniLM tokens


def batch(length: int = 100, vocab: int = 99) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length - 23 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a failed call must leave as it was: the weights and the config."""
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(model.config.to_dict())


def assert_same_state(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict]) -> None:
    weights, config = before
    now = model.state_dict()
    assert now.keys() == weights.keys() and all(torch.equal(now[k], weights[k]) for k in weights)
    assert model.config.to_dict() == config


def lsg_hooks(model: nn.Module) -> list[LSGHook]:
    """The LSGHooks registered anywhere in `model`, read from torch's own dictionaries (an independent count)."""
    return [hook for module in model.modules() for hooks in (module._forward_pre_hooks, module._forward_hooks)
            for hook in hooks.values() if isinstance(hook, LSGHook)]  # fmt: skip


# --- item 18: one options object --------------------------------------------------------------------------


def test_to_lsg_shows_the_options_of_the_one_options_object() -> None:
    from lsg_patch.options import ConversionOptions

    parameters = inspect.signature(lsg_patch.to_lsg).parameters
    keyword_only = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    assert keyword_only | {"max_length"} == {f.name for f in fields(ConversionOptions)} | {"tokenizer"}
    assert set(option_names()) <= {f.name for f in fields(ConversionOptions)}
    with pytest.raises(ValueError, match=r"unknown LSG option 'block_sise' \(did you mean 'block_size'\?\)"):
        lsg_patch.to_lsg(tiny_model("bert"), block_sise=32)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(global_positional_stride=-7, bos_token_id=10**9), r"global_positional_stride=-7 is not accepted"),
        (dict(mask_token_id=-1), r"mask_token_id=-1 is not accepted"),
        (dict(random_global_init="yes"), r"random_global_init='yes' is not accepted"),
        (dict(seed=-1), r"seed=-1 is not accepted"),
        (dict(bos_token_id=10**9), r"bos_token_id=1000000000: these only seed new global tokens.*from_lsg"),
        (dict(seed=3, block_size=32), r"seed=3: these only seed new global tokens"),
        (dict(block_size=30, sparsity_factor=4), r"block_size=30 is not a multiple of sparsity_factor=4"),
        (dict(sparsity_factor=3), r"block_size=16 is not a multiple of sparsity_factor=3"),  # merged with the current
    ],
)
def test_reconfiguring_validates_every_option_and_changes_nothing(options, message) -> None:
    """Issue 19 item 7: re-configuration skipped the seeding options' validation and ignored them."""
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, **SMALL)
    before = state(model)
    with pytest.raises(ValueError, match=message):
        lsg_patch.to_lsg(model, **options)
    assert_same_state(model, before)


def test_reconfiguring_without_max_length_keeps_the_length_and_the_other_options() -> None:
    """Issue 19 item 6: re-configuring without max_length grew the table to 4096 rows."""
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, num_global_tokens=2, **SMALL)
    lsg_patch.to_lsg(model, block_size=32)
    assert model.embeddings.position_embeddings.weight.shape[0] == 128
    assert model.config.max_position_embeddings == 128
    settings = (model.config.block_size, model.config.sparse_block_size, model.config.num_global_tokens)
    assert settings == (32, 16, 2)
    direct = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, num_global_tokens=2, block_size=32, sparse_block_size=16)
    inputs = batch()
    assert torch.allclose(model(**inputs).last_hidden_state, direct(**inputs).last_hidden_state, atol=1e-6)


def test_reconfiguring_a_model_longer_than_4096_without_max_length_keeps_its_length() -> None:
    """Issue 19 item 6: it raised about a max_length=4096 the user never gave."""
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=8192, **SMALL)
    lsg_patch.to_lsg(model, block_size=32)
    assert model.embeddings.position_embeddings.weight.shape[0] == 8192 and model.config.block_size == 32


# --- item 5: a conversion changes its own model only ------------------------------------------------------


def test_a_conversion_does_not_write_into_a_config_other_models_share(tmp_path) -> None:
    config = tiny_config("bert")
    torch.manual_seed(0)
    first, second = BertModel(config).eval(), BertModel(config).eval()
    lsg_patch.to_lsg(first, max_length=128, **SMALL)
    assert config.max_position_embeddings == 64 and not has_lsg_settings(config)
    assert second.config is config
    assert first.config.max_position_embeddings == 128 and first.config.block_size == 16
    assert not any(module.__dict__.get("config") is config for module in first.modules())
    second.save_pretrained(tmp_path)  # a plain checkpoint that reloads as one
    reloaded = BertModel.from_pretrained(tmp_path)
    assert reloaded.embeddings.position_embeddings.weight.shape[0] == 64
    lsg_patch.to_lsg(second, max_length=256, **SMALL)  # refused before: "loaded by plain transformers"
    assert second.config.max_position_embeddings == 256 and first.config.max_position_embeddings == 128


# --- items 3 and 9: from_lsg takes what to_lsg takes, and gives the lengths back ------------------------------


def test_from_lsg_gives_the_tokenizer_back_its_length() -> None:
    """Issue 19 item 9: the tokenizer stayed at the LSG length and the next truncated call crashed."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = tiny_model("bert", vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    lsg_patch.to_lsg(model, max_length=1024, tokenizer=tokenizer, **SMALL)
    assert tokenizer.model_max_length == 1024
    with pytest.raises(ValueError, match="tokenizer=42 is not accepted"):
        lsg_patch.from_lsg(model, tokenizer=42)
    assert lsg_patch.is_lsg_model(model) and tokenizer.model_max_length == 1024  # the failed call changed nothing
    lsg_patch.from_lsg(model, tokenizer=tokenizer)
    assert tokenizer.model_max_length == 512 and tokenizer.init_kwargs["model_max_length"] == 512
    inputs = tokenizer(["word " * 2000], truncation=True, return_tensors="pt")
    assert model(**inputs).last_hidden_state.shape[1] == 512


def test_from_lsg_undoes_a_sentence_transformer_and_a_failed_call_changes_nothing() -> None:
    """Issue 19 item 3: from_lsg(SentenceTransformer) raised after removing the LSG attention only."""
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
    model = SentenceTransformer(minilm_path(), device="cpu")
    reference = model.encode([LONG], convert_to_tensor=True)
    lsg_patch.to_lsg(model, max_length=1024, **SMALL)
    with pytest.raises(ValueError, match="is a path, not a tokenizer"):
        lsg_patch.from_lsg(model, tokenizer="path/to/tokenizer")
    assert lsg_patch.is_lsg_model(model) and model.max_seq_length == 1024
    lsg_patch.from_lsg(model)
    inner = model[0].auto_model
    assert not lsg_patch.is_lsg_model(model) and not lsg_hooks(inner)
    assert model.max_seq_length == 256 and inner.embeddings.position_embeddings.weight.shape[0] == 512
    assert not hasattr(inner.embeddings, "global_embeddings") and not has_lsg_settings(inner.config)
    assert torch.allclose(model.encode([LONG], convert_to_tensor=True), reference, atol=1e-6)


# --- item 8: the CLI keeps trained global tokens as to_lsg does --------------------------------------------


@pytest.fixture(scope="module")
def lsg_folder(tmp_path_factory) -> Path:
    """A tiny BertForMaskedLM converted to 256 tokens (block 16), with trained-looking global tokens, saved."""
    folder = tmp_path_factory.mktemp("lsg")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = tiny_model("bert", AutoModelForMaskedLM, vocab_size=tokenizer.vocab_size)
    lsg_patch.to_lsg(model, max_length=256, tokenizer=tokenizer, num_global_tokens=2, **SMALL)
    with torch.no_grad():
        model.bert.embeddings.global_embeddings.weight.normal_(generator=torch.Generator().manual_seed(5))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_convert_of_an_lsg_folder_keeps_its_global_tokens_and_length(lsg_folder, tmp_path, capsys) -> None:
    """Issue 19 item 8: `lsg-patch convert` re-initialised the trained global tokens by default."""
    assert main(["convert", str(lsg_folder), str(tmp_path / "out"), "--block-size", "32", "--no-progress"]) == 0
    converted = lsg_patch.from_pretrained(tmp_path / "out")
    expected = lsg_patch.to_lsg(lsg_patch.from_pretrained(lsg_folder), block_size=32)
    assert converted.config.block_size == 32 and converted.config.num_global_tokens == 2
    assert converted.bert.embeddings.position_embeddings.weight.shape[0] == 256  # the saved length, not 4096
    got, want = converted.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").model_max_length == 256


def test_cli_reinitialises_global_tokens_only_when_asked(lsg_folder, tmp_path, capsys) -> None:
    assert main(["convert", str(lsg_folder), str(tmp_path / "bad"), "--seed", "3", "--no-progress"]) == 1
    assert "--seed seeds new global tokens" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["convert", str(lsg_folder), str(tmp_path / "new"), "--reinitialize-global-tokens",
                 "--keep-first-global-token", "--no-progress"]) == 0  # fmt: skip
    trained = lsg_patch.from_pretrained(lsg_folder).bert.embeddings.global_embeddings.weight
    fresh = lsg_patch.from_pretrained(tmp_path / "new")
    table = fresh.bert.embeddings.global_embeddings.weight
    assert torch.equal(table[0], trained[0]) and not torch.equal(table[1], trained[1])
    assert fresh.config.block_size == 16 and fresh.config.num_global_tokens == 2  # the saved settings stay


# --- item 13: sentence-transformers folders converted on load ------------------------------------------------


def test_a_plain_sentence_transformers_folder_converted_on_load_takes_long_texts() -> None:
    """Issue 19 item 13: max_seq_length stayed at 256 and long texts were still cut silently."""
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
    with lsg_patch.enabled(max_length=1024, **SMALL):
        model = SentenceTransformer(minilm_path(), device="cpu")
    assert lsg_patch.is_lsg_model(model) and model.max_seq_length == 1024
    assert model.tokenize([LONG])["input_ids"].shape[1] == 1024
    expected = lsg_patch.to_lsg(SentenceTransformer(minilm_path(), device="cpu"), max_length=1024, **SMALL)
    assert torch.allclose(model.encode([LONG], convert_to_tensor=True),
                          expected.encode([LONG], convert_to_tensor=True), atol=1e-5)  # fmt: skip


def test_lsg_patch_run_with_max_length_raises_a_sentence_transformers_length() -> None:
    pytest.importorskip("sentence_transformers")
    from lsg_patch.run import child_environment

    env = child_environment({"max_length": 1024, **SMALL}, dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    script = ("import lsg_patch; from sentence_transformers import SentenceTransformer; "
              f"m = SentenceTransformer({minilm_path()!r}, device='cpu'); print(lsg_patch.is_lsg_model(m), m.max_seq_length)")  # fmt: skip
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["True", "1024"]


# --- item 11: clear errors, said what happened ----------------------------------------------------------------


def test_an_absurd_max_length_is_refused_with_a_clear_message() -> None:
    model = tiny_model("bert")
    before = state(model)
    with pytest.raises(ValueError, match=r"max_length=1000000000 would need position tables of 119 GiB.*max_length <= "):
        lsg_patch.to_lsg(model, max_length=10**9)
    assert_same_state(model, before)


def test_info_on_a_file_says_it_is_a_file(tmp_path, capsys) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a folder")
    assert main(["info", str(file)]) == 1
    assert "is a file, not a checkpoint folder" in capsys.readouterr().err


def test_info_on_a_folder_without_model_type_fails(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32}))
    assert main(["info", str(tmp_path)]) == 1
    assert "has no model_type" in capsys.readouterr().err


def tiny_llama(**ids) -> nn.Module:
    config = AutoConfig.for_model("llama", vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, **ids)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_rotary_global_tokens_without_token_ids_are_reported_as_zero_vectors(caplog) -> None:
    caplog.set_level(logging.INFO, logger="lsg_patch")
    model = lsg_patch.to_lsg(tiny_llama(bos_token_id=1, eos_token_id=2, pad_token_id=None), max_length=256,
                             num_global_tokens=3, **SMALL)  # fmt: skip
    table = model.model.global_embeddings.weight
    assert table[0].any() and not table[1:3].any()
    warning = [r for r in caplog.records if r.levelno == logging.WARNING and "zero vectors" in r.getMessage()]
    assert len(warning) == 1 and "global token(s) [1, 2]" in warning[0].getMessage()
    assert "rotary positions have no vectors" in warning[0].getMessage()
    assert "position-only" not in caplog.text
    caplog.clear()
    lsg_patch.to_lsg(tiny_llama(), max_length=256, num_global_tokens=3, bos_token_id=1, mask_token_id=4, **SMALL)
    assert "zero vectors" not in caplog.text


def test_enabled_lsg_options_apply_to_a_saved_lsg_folder(lsg_folder, caplog) -> None:
    """Issue 19 item 11: enabled(block_size=...) around loading a saved LSG folder was silently ignored."""
    caplog.set_level(logging.INFO, logger="lsg_patch")
    with lsg_patch.enabled(max_length=1024, block_size=32, sparsity_type="lsh"):
        model = AutoModelForMaskedLM.from_pretrained(lsg_folder)
    assert (model.config.block_size, model.config.sparsity_type, model.config.sparse_block_size) == (32, "lsh", 16)
    assert model.bert.embeddings.position_embeddings.weight.shape[0] == 256  # max_length is for plain checkpoints
    assert "override the saved settings" in caplog.text
    expected = lsg_patch.to_lsg(lsg_patch.from_pretrained(lsg_folder), block_size=32, sparsity_type="lsh")
    inputs = batch(200, vocab=1000)
    assert torch.allclose(model(**inputs).logits, expected(**inputs).logits, atol=1e-6)


# --- items 19 and 21: the resolver's checks, the layout, the hooks ----------------------------------------


class NotThroughTheInterface(nn.Module):
    """A self-attention stand-in that computes its own attention (never reads ALL_ATTENTION_FUNCTIONS)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


def test_architecture_support_runs_the_checks_to_lsg_runs() -> None:
    """Issue 19 item 19: it said "registered" for models to_lsg refuses."""
    model = tiny_model("bert")
    model.encoder.layer[1].attention.self = NotThroughTheInterface(model.config)
    message = r"NotThroughTheInterface .* does not call its attention through transformers' AttentionInterface"
    with pytest.raises(ValueError, match=message):
        lsg_patch.architecture_support(model)
    with pytest.raises(ValueError, match=message):
        lsg_patch.to_lsg(model, max_length=128)
    assert lsg_patch.architecture_support(tiny_model("bert")) == "registered"


def test_the_moved_public_names_keep_their_old_import_paths() -> None:
    import lsg_patch.families.base
    import lsg_patch.inference
    import lsg_patch.persistence
    import lsg_patch.registry

    assert lsg_patch.registry.entry_for is lsg_patch.inference.entry_for
    assert lsg_patch.registry.architecture_support is lsg_patch.architecture_support
    assert lsg_patch.persistence.from_pretrained is lsg_patch.from_pretrained
    assert lsg_patch.families.base.FamilyAdapter is lsg_patch.registry.FamilyAdapter


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_renamed_modules_keep_their_old_paths(old: str, new: str) -> None:
    """Item 21: a renamed module still imports by its old name, as the same module (pickles name classes by it)."""
    import importlib

    assert importlib.import_module(old) is importlib.import_module(new)


def test_a_cache_pickled_under_the_old_module_path_loads() -> None:
    """An LSGCache pickled before seam/cache.py became seam/lsg_cache.py names its class by the old path."""
    import pickle

    from lsg_patch.seam.lsg_cache import LSGCache

    payload = pickle.dumps(LSGCache(), protocol=2).replace(b"lsg_patch.seam.lsg_cache", b"lsg_patch.seam.cache")
    assert b"lsg_patch.seam.cache\n" in payload
    assert type(pickle.loads(payload)) is LSGCache


def _imports(path: Path, module: str) -> set[str]:
    """The lsg_patch modules `module` imports, anywhere in its code, except under TYPE_CHECKING and in a
    module-level __getattr__ (the import aliases of moved names)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree)
               if (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
               or (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")
               for n in ast.walk(node)}  # fmt: skip
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom):
            continue
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
        target = ".".join(filter(None, [base, node.module]))
        found.update(([target] if node.module else []) + [f"{target}.{alias.name}" for alias in node.names])
    return found


def test_the_package_has_no_import_cycle() -> None:
    """Issue 19 item 19: persistence <-> context and registry <-> inference imported each other."""
    package = ROOT / "lsg_patch"
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: {t for t in _imports(path, name) if t in modules and t != name} for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    cycles = sorted(f"{a} -> {b}" for a in graph for b in graph[a] if reaches(b, a, set()))
    assert not cycles


def test_hooks_are_removed_by_their_handles_also_in_copies() -> None:
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, **SMALL)
    count = len(lsg_hooks(model))
    lsg_patch.to_lsg(model, block_size=32)  # re-configuring replaces the hooks, it does not add to them
    assert len(lsg_hooks(model)) == count > 0
    inputs = batch()
    expected = model(**inputs).last_hidden_state
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        lsg_patch.from_lsg(twin)
        assert not lsg_hooks(twin) and not lsg_patch.is_lsg_model(twin)
        assert len(lsg_hooks(model)) == count and lsg_patch.is_lsg_model(model)
    assert torch.equal(model(**inputs).last_hidden_state, expected)
