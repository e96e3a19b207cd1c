"""The public registry API: adding an architecture lsg_patch does not ship, and clear errors for wrong entries."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

import lsg_patch
from lsg_patch import ArchitectureEntry
from lsg_patch.registry import markdown_table

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, initializer_range=0.2)  # fmt: skip
LSG = dict(block_size=8, sparse_block_size=8, sparsity_factor=2, num_global_tokens=2)
ERNIE = ArchitectureEntry(
    adapter="lsg_patch.families.bert:BertFamily",
    self_attention="encoder.layer.*.attention.self",
    position_embeddings="embeddings.position_embeddings",
    word_embeddings="embeddings.word_embeddings",
    token_type_embeddings="embeddings.token_type_embeddings",
    description="ERNIE: the BERT layout",
)


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **TINY)).eval()


@pytest.fixture
def ernie_registered():
    assert "ernie" not in lsg_patch.supported_architectures(), "ernie is built in now: pick another test type"
    lsg_patch.register("ernie", ERNIE)
    yield
    lsg_patch.unregister("ernie")


def test_registered_architecture_is_patched_like_its_built_in_relative(ernie_registered) -> None:
    """ERNIE without task types is BERT: with the same weights both patched models give the same outputs."""
    ernie = tiny("ernie")
    bert = tiny("bert")
    bert.load_state_dict(ernie.state_dict(), strict=True)
    ids = torch.randint(1, 99, (2, 75), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    for model in (ernie, bert):
        lsg_patch.to_lsg(model, max_length=128, bos_token_id=1, mask_token_id=2, **LSG)
    assert set(ernie.state_dict()) == set(bert.state_dict())
    assert torch.equal(ernie.embeddings.global_embeddings.weight, bert.embeddings.global_embeddings.weight)
    with torch.no_grad():
        got = ernie(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.shape == (2, 75, 32)
    assert (got - expected).abs().max().item() < 1e-6
    assert lsg_patch.is_lsg_model(ernie)
    lsg_patch.from_lsg(ernie)
    assert not lsg_patch.is_lsg_model(ernie)


def test_registering_twice_needs_replace_existing(ernie_registered) -> None:
    with pytest.raises(ValueError, match="'ernie' is already registered"):
        lsg_patch.register("ernie", ERNIE)
    lsg_patch.register("ernie", ERNIE, replace_existing=True)


def test_wrong_adapter_path_fails_at_registration_naming_entry_and_path() -> None:
    entry = lsg_patch.registry.with_changes(ERNIE, adapter="lsg_patch.families.nowhere:BertFamily")
    with pytest.raises(ValueError, match=r"registry entry 'ernie': adapter path 'lsg_patch\.families\.nowhere:BertFamily'"):
        lsg_patch.register("ernie", entry)
    entry = lsg_patch.registry.with_changes(ERNIE, adapter="lsg_patch.families.bert:NoSuchFamily")
    with pytest.raises(ValueError, match="NoSuchFamily"):
        lsg_patch.register("ernie", entry)
    assert "ernie" not in lsg_patch.supported_architectures()


def test_wrong_module_path_fails_at_to_lsg_naming_entry_and_path_and_changes_nothing() -> None:
    entry = lsg_patch.registry.with_changes(ERNIE, self_attention="encoder.layers.*.attention.self")
    lsg_patch.register("ernie", entry)
    try:
        model = tiny("ernie")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"registry entry 'ernie': self_attention path 'encoder\.layers\.\*\.attention\.self'"):
            lsg_patch.to_lsg(model, max_length=128, **LSG)
        lsg_patch.register("ernie", lsg_patch.registry.with_changes(ERNIE, word_embeddings="embeddings.words"),
                           replace_existing=True)  # fmt: skip
        with pytest.raises(ValueError, match=r"registry entry 'ernie': word_embeddings path 'embeddings\.words'"):
            lsg_patch.to_lsg(model, max_length=128, **LSG)
    finally:
        lsg_patch.unregister("ernie")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not lsg_patch.is_lsg_model(model)


def test_unregistered_type_is_refused_with_the_supported_list() -> None:
    opt = AutoModel.from_config(AutoConfig.for_model("opt", **TINY, ffn_dim=64, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match=r"model_type 'opt' .* could not be inferred.*lsg_patch\.register\('opt'.*"
                                         r"Registered model types: .*bert"):
        lsg_patch.to_lsg(opt, max_length=128)
    with pytest.raises(KeyError, match="'ernie' is not registered"):
        lsg_patch.unregister("ernie")


@pytest.mark.parametrize(("model_type", "reason"), [
    ("deberta-v2", "disentangled attention"), ("longformer", "its own sparse attention"),
    ("big_bird", "block-sparse"), ("led", "its own sparse attention"), ("longt5", "local or transient-global"),
])  # fmt: skip
def test_models_that_cannot_take_lsg_are_refused_with_the_reason(model_type: str, reason: str) -> None:
    config = AutoConfig.for_model(model_type, vocab_size=99, hidden_size=32, d_model=32, num_hidden_layers=1,
                                  num_layers=1, encoder_layers=1, decoder_layers=1, num_attention_heads=4, num_heads=4,
                                  encoder_attention_heads=4, decoder_attention_heads=4, intermediate_size=64,
                                  d_ff=64, d_kv=8, encoder_ffn_dim=64, decoder_ffn_dim=64, attention_window=8)
    model = AutoModel.from_config(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"model_type {model_type!r} .*cannot take LSG attention: .*{reason}"):
        lsg_patch.to_lsg(model, max_length=4096)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and not lsg_patch.is_lsg_model(model)


def test_readme_table_is_the_registry() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert markdown_table() in readme, "README's supported-architectures table differs: paste registry.markdown_table()"
