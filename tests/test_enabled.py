"""lsg_patch.enabled(): what from_pretrained returns inside the block, and that nothing is left patched after it."""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import pytest
import torch
import transformers
import wrapt
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, BertModel, PreTrainedModel

import lsg_patch
from tests.tiny_models import tiny_model

CONVERT = dict(block_size=16, sparse_block_size=16, sparsity_factor=2, num_global_tokens=2, bos_token_id=1, mask_token_id=2)


@pytest.fixture
def lsg_logs(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="lsg_patch")
    monkeypatch.setattr(lsg_patch.context, "_REMOTE_CODE_NOTED", False, raising=False)  # a fresh process
    return caplog


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plain")
    tiny_model("bert", AutoModelForSequenceClassification).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lsg_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lsg")
    model = tiny_model("bert", AutoModelForSequenceClassification, max_position_embeddings=128)
    lsg_patch.to_lsg(model, max_length=512, **CONVERT)
    model.save_pretrained(path)
    return path


def long_batch(length: int = 200) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length - 37 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def patched_attributes() -> list[object]:
    """Every attribute enabled() may wrap, as currently bound."""
    from transformers import dynamic_module_utils

    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    values = [
        PreTrainedModel.__dict__["from_pretrained"],
        PreTrainedModel.__dict__["_load_pretrained_model"],
        PreTrainedTokenizerBase.__dict__["from_pretrained"],
        dynamic_module_utils.__dict__["get_class_in_module"],
    ]
    values += [m.__dict__["resolve_trust_remote_code"] for n, m in list(sys.modules.items())
               if n.startswith("transformers") and m is not None and "resolve_trust_remote_code" in m.__dict__]  # fmt: skip
    return values


def assert_nothing_patched() -> None:
    wrapped = [v for v in patched_attributes() if isinstance(v, wrapt.FunctionWrapper)]
    assert not wrapped, f"still patched after the block: {wrapped}"


def test_plain_checkpoint_is_converted_with_the_block_overrides_by_auto_and_concrete_classes(plain_dir) -> None:
    oracle = AutoModelForSequenceClassification.from_pretrained(plain_dir)
    lsg_patch.to_lsg(oracle, max_length=256, **CONVERT)
    with lsg_patch.enabled(max_length=256, **CONVERT):
        by_auto = AutoModelForSequenceClassification.from_pretrained(plain_dir)
        by_class = transformers.BertForSequenceClassification.from_pretrained(plain_dir)
    batch = long_batch()
    with torch.no_grad():
        expected = oracle(**batch).logits
        for model in (by_auto, by_class):
            assert lsg_patch.is_lsg_model(model)
            assert model.config.max_position_embeddings == 256 and model.config.block_size == 16
            assert torch.equal(model(**batch).logits, expected)
    assert_nothing_patched()


def test_without_max_length_a_plain_checkpoint_loads_unchanged(plain_dir, lsg_logs) -> None:
    reference = AutoModel.from_pretrained(plain_dir)
    with lsg_patch.enabled(block_size=16):
        model = AutoModel.from_pretrained(plain_dir)
    assert not lsg_patch.is_lsg_model(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert "plain checkpoint and enabled() got no max_length: loaded unchanged" in lsg_logs.text


def test_lsg_options_for_a_plain_checkpoint_without_max_length_raise(plain_dir) -> None:
    with lsg_patch.enabled(), pytest.raises(ValueError, match=r"plain checkpoint .* no max_length"):
        AutoModel.from_pretrained(plain_dir, block_size=16)
    assert_nothing_patched()


def test_lsg_checkpoint_is_rebuilt_with_the_blocks_lsg_options_at_its_saved_length(lsg_dir, lsg_logs) -> None:
    """The block's LSG options apply to saved LSG checkpoints too (as to_lsg would re-configure them); its
    max_length is for plain checkpoints: a saved model keeps its length and its trained global tokens."""
    with lsg_patch.enabled(max_length=1024, block_size=32, sparsity_type="none"):
        model = AutoModelForSequenceClassification.from_pretrained(lsg_dir)
    assert model.config.block_size == 32 and model.config.sparsity_type == "none"
    assert model.config.sparse_block_size == 16 and model.config.num_global_tokens == 2  # saved, not given
    assert model.config.max_position_embeddings == 512
    assert "rebuilt BertForSequenceClassification as an LSG model" in lsg_logs.text
    assert "override the saved settings" in lsg_logs.text
    expected = lsg_patch.to_lsg(lsg_patch.from_pretrained(lsg_dir), block_size=32, sparsity_type="none")
    batch = long_batch()
    assert torch.allclose(model(**batch).logits, expected(**batch).logits, atol=1e-6)


def test_model_card_keyword_arguments_override_saved_settings(lsg_dir, tmp_path, lsg_logs) -> None:
    """The LSG model cards' call, with only the path changed; trust_remote_code is accepted, no code runs."""
    sentinel = tmp_path / "remote_code_ran"
    folder = tmp_path / "card"
    folder.mkdir()
    for file in lsg_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_lsg_bert.LSGBertConfig", "AutoModel": "modeling_lsg_bert.LSGBertModel",
                          "AutoModelForSequenceClassification": "modeling_lsg_bert.LSGBertForSequenceClassification"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_lsg_bert.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")

    with lsg_patch.enabled():
        model = AutoModel.from_pretrained(
            str(folder),
            trust_remote_code=True,
            num_global_tokens=16,
            block_size=64,
            sparse_block_size=64,
            sparsity_factor=4,
            sparsity_type="none",
            mask_first_token=True,
            pool_with_global=True,
            pass_global_tokens_to_decoder=True,
            attention_probs_dropout_prob=0.0,
        )
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
        saved = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    assert not sentinel.exists(), "code shipped with the checkpoint was executed"
    assert type(config).__name__ == "BertConfig" and type(model).__name__ == "BertModel"
    assert lsg_logs.text.count("trust_remote_code=True is ignored") == 1
    assert (model.config.num_global_tokens, model.config.block_size, model.config.sparse_block_size) == (16, 64, 64)
    assert (model.config.sparsity_factor, model.config.sparsity_type, model.config.mask_first_token) == (4, "none", True)
    assert model.config.attention_probs_dropout_prob == 0.0
    assert not hasattr(model.config, "auto_map")
    # The trained global table is kept (16 of its 512 rows are used now) and the result is what to_lsg gives.
    table = model.embeddings.global_embeddings.weight
    assert table.shape[0] == 512 and torch.equal(table, saved.embeddings.global_embeddings.weight)
    lsg_patch.to_lsg(saved, max_length=512, num_global_tokens=16, block_size=64, sparse_block_size=64,
                     sparsity_factor=4, sparsity_type="none", mask_first_token=True)  # fmt: skip
    batch = long_batch(300)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, saved(**batch).last_hidden_state)


def test_the_trust_remote_code_notice_is_logged_once_per_process(lsg_dir, lsg_logs) -> None:
    """A script loads in several blocks (or calls a helper that opens one); the README promises one notice."""
    for _ in range(3):
        with lsg_patch.enabled():
            AutoModel.from_pretrained(lsg_dir, trust_remote_code=True)
    assert lsg_logs.text.count("trust_remote_code=True is ignored") == 1


def test_remote_code_only_checkpoint_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-transformers-type",
                                                      "auto_map": {"AutoConfig": "modeling_x.XConfig"}}))  # fmt: skip
    (tmp_path / "modeling_x.py").write_text("raise SystemExit('must never run')\n")
    with lsg_patch.enabled(), pytest.raises(ValueError, match="never runs code from a checkpoint"):
        AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert_nothing_patched()


def test_other_keyword_arguments_reach_transformers(lsg_dir) -> None:
    with lsg_patch.enabled():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            lsg_dir, dtype=torch.bfloat16, output_loading_info=True, num_labels=3, ignore_mismatched_sizes=True
        )
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert model.bert.embeddings.global_embeddings.weight.dtype == torch.bfloat16
    assert "classifier.weight" in str(info["mismatched_keys"])


def test_patches_are_removed_on_exit_also_when_the_block_raises(plain_dir) -> None:
    before = patched_attributes()
    with pytest.raises(RuntimeError, match="boom"):
        with lsg_patch.enabled(max_length=128):
            assert any(isinstance(v, wrapt.FunctionWrapper) for v in patched_attributes())
            raise RuntimeError("boom")
    after = patched_attributes()
    assert len(before) == len(after) and all(a is b for a, b in zip(before, after))
    assert not lsg_patch.is_lsg_model(AutoModel.from_pretrained(plain_dir))


def test_a_module_imported_inside_the_block_is_cleaned_on_exit() -> None:
    name = "transformers.models.auto.video_processing_auto"
    sys.modules.pop(name, None)
    with lsg_patch.enabled():
        __import__(name)
    assert not isinstance(sys.modules[name].__dict__.get("resolve_trust_remote_code"), wrapt.FunctionWrapper)


def test_nested_blocks_merge_and_restore(plain_dir) -> None:
    with lsg_patch.enabled(max_length=256, **CONVERT):
        with lsg_patch.enabled(num_global_tokens=3, sparsity_type="pooling"):
            inner = BertModel.from_pretrained(plain_dir)
        assert any(isinstance(v, wrapt.FunctionWrapper) for v in patched_attributes())
        outer = BertModel.from_pretrained(plain_dir)
    assert (inner.config.num_global_tokens, inner.config.sparsity_type, inner.config.block_size) == (3, "pooling", 16)
    assert (outer.config.num_global_tokens, outer.config.sparsity_type) == (2, "norm")
    assert_nothing_patched()


def test_threads_without_a_block_see_plain_transformers(plain_dir) -> None:
    """Patches are process-wide while any block is open, but only a thread that opened a block gets LSG models;
    blocks of different threads may close in any order. The loads are serialised on purpose: transformers'
    own from_pretrained is not safe to run in several threads at once (its init contexts are global)."""
    entered, other_done, own_entered, main_exited = (threading.Event() for _ in range(4))
    results = {}

    def other_thread() -> None:
        entered.wait(60)
        results["other"] = BertModel.from_pretrained(plain_dir)
        other_done.set()

    def own_block() -> None:
        with lsg_patch.enabled(max_length=512, block_size=32, bos_token_id=1, mask_token_id=2):
            own_entered.set()
            main_exited.wait(60)  # the main thread's block, opened first, is closed by now
            results["still_patched"] = any(isinstance(v, wrapt.FunctionWrapper) for v in patched_attributes())
            results["own"] = BertModel.from_pretrained(plain_dir)

    threads = [threading.Thread(target=other_thread), threading.Thread(target=own_block)]
    with lsg_patch.enabled(max_length=256, **CONVERT):
        for thread in threads:
            thread.start()
        entered.set()
        assert other_done.wait(120) and own_entered.wait(60)
        results["main"] = BertModel.from_pretrained(plain_dir)
    main_exited.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not lsg_patch.is_lsg_model(results["other"])
    assert lsg_patch.is_lsg_model(results["main"]) and results["main"].config.max_position_embeddings == 256
    assert results["still_patched"] and results["own"].config.max_position_embeddings == 512
    assert_nothing_patched()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"blocksize": 16}, r"unknown LSG option 'blocksize' \(did you mean 'block_size'\?\)"),
        ({"sparsity_type": "nrom"}, r"sparsity_type='nrom' is not accepted \(did you mean 'norm'\?\)"),
        ({"max_length": "4096"}, r"max_length='4096' is not accepted"),
        ({"block_size": 100, "sparsity_factor": 3}, r"block_size=100 is not a multiple of sparsity_factor=3"),
        ({"num_global_tokens": 0}, r"num_global_tokens=0 is not accepted"),
        ({"sparsity_factor": 0}, r"sparsity_factor=0 is not accepted"),
        ({"max_length": 256, "tokenizer": "path/to/tokenizer"}, r"tokenizer='path/to/tokenizer' is a path"),
        ({"max_length": 256, "tokenizer": 42}, r"tokenizer=42 is not accepted"),
        ({"max_length": 256, "seed": "a"}, r"seed='a' is not accepted"),
        ({"max_length": 256, "random_global_init": "yes"}, r"random_global_init='yes' is not accepted"),
        ({"max_length": 256, "global_positional_stride": 0}, r"global_positional_stride=0 is not accepted"),
    ],
)
def test_bad_options_raise_before_anything_is_patched(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        with lsg_patch.enabled(**kwargs):
            pytest.fail("the block must not run")
    assert_nothing_patched()


def test_bad_from_pretrained_lsg_option_raises(lsg_dir) -> None:
    with lsg_patch.enabled(), pytest.raises(ValueError, match=r"sparsity_factor=3"):
        AutoModel.from_pretrained(lsg_dir, sparsity_factor=3)  # saved block_size 16 is not a multiple of 3


def test_block_options_are_checked_alone_then_merged_with_from_pretrained_options(plain_dir) -> None:
    """sparsity_factor=3 fits no default block size, but the block size may come later (from_pretrained)."""
    with lsg_patch.enabled(max_length=256, sparsity_factor=3, bos_token_id=1, mask_token_id=2):
        model = BertModel.from_pretrained(plain_dir, block_size=48)
        with pytest.raises(ValueError, match=r"block_size=128 is not a multiple of sparsity_factor=3"):
            BertModel.from_pretrained(plain_dir)
    assert (model.config.sparsity_factor, model.config.block_size) == (3, 48)


def test_a_tokenizer_given_to_the_block_is_raised_to_max_length(plain_dir) -> None:
    from transformers import AutoTokenizer

    from tests.helpers import minilm_folder as minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    with lsg_patch.enabled(max_length=1024, tokenizer=tokenizer, bos_token_id=1, mask_token_id=2):
        model = BertModel.from_pretrained(plain_dir)
    assert lsg_patch.is_lsg_model(model) and tokenizer.model_max_length == 1024
