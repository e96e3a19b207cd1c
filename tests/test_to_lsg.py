"""to_lsg / from_lsg on the BERT family: structure, configuration, errors, atomicity, padding invariance."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    OPTConfig,
    OPTModel,
)

import lsg_patch
from lsg_patch.config import option_names
from tests.helpers import minilm_folder as minilm_path
from tests.tiny_models import BERT_FAMILY, tiny_model

HEADS = (AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
         AutoModelForQuestionAnswering, AutoModelForMultipleChoice, AutoModelForPreTraining)  # fmt: skip
SMALL = dict(block_size=4, sparse_block_size=4, sparsity_factor=2)
IDS = dict(bos_token_id=1, mask_token_id=2)


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test draws its token ids from the same seeded global generator (reproducible failures)."""
    torch.manual_seed(0)


def snapshot(model: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(name, type(m)) for name, m in model.named_modules()]
    return state, types, model.config.to_dict()


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, types, config = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert types == before[1]
    assert config == before[2]


# transformers has no ForPreTraining class for CamemBERT and XLM-RoBERTa
HEAD_CASES = [(t, h) for t in BERT_FAMILY for h in HEADS
              if not (h is AutoModelForPreTraining and t in ("camembert", "xlm-roberta"))]  # fmt: skip


@pytest.mark.parametrize("model_type, head", HEAD_CASES)
def test_every_head_converts_and_runs_long_inputs(model_type, head):
    model = tiny_model(model_type, head)
    keys = set(model.state_dict())
    assert lsg_patch.to_lsg(model, max_length=256, **SMALL) is model
    prefix = model.base_model_prefix + "." if model is not model.base_model else ""
    assert set(model.state_dict()) == keys | {f"{prefix}embeddings.global_embeddings.weight"}
    assert model.config.max_position_embeddings == 256 + (2 if model_type != "bert" and model_type != "electra" else 0)
    ids = torch.randint(5, 90, (2, 150))
    mask = torch.ones_like(ids)
    mask[1, 120:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if head is AutoModelForMultipleChoice:
        inputs = {k: v.unsqueeze(1).expand(-1, 2, -1).contiguous() for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**inputs)
    first = out[0] if not hasattr(out, "logits") else out.logits
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("model_type", BERT_FAMILY)
def test_causal_lm_head_runs_as_decoder(model_type):
    model = tiny_model(model_type, AutoModelForCausalLM, is_decoder=True)
    lsg_patch.to_lsg(model, max_length=128, **SMALL)
    ids = torch.randint(5, 90, (1, 40))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        prefix = model(input_ids=ids[:, :20], use_cache=False).logits
    # causal: the first 20 positions cannot see what follows them
    assert torch.allclose(full[:, :19], prefix[:, :19], atol=1e-5)


def test_config_records_reference_keys_and_positions_are_tiled():
    model = tiny_model("roberta")
    table = model.embeddings.position_embeddings.weight.detach().clone()
    lsg_patch.to_lsg(model, max_length=200, sparsity_type="bos_pooling", **{k: v for k, v in SMALL.items()})
    config = model.config
    assert config.sparsity_type == "bos_pooling" and config.block_size == 4 and config.num_global_tokens == 1
    assert {"adaptive", "block_size", "lsh_num_pre_rounds", "mask_first_token", "num_global_tokens",
            "pool_with_global", "sparse_block_size", "sparsity_factor", "sparsity_type"} <= set(config.to_dict())  # fmt: skip
    new = model.embeddings.position_embeddings.weight.detach()
    assert new.shape[0] == 202 and torch.equal(new[:66], table)
    assert torch.equal(new[66:130], table[2:])  # tiled after the two offset rows
    assert model.embeddings.position_ids.shape[-1] == 202
    assert model.embeddings.position_embeddings.padding_idx == 1


def test_max_length_equal_to_current_size_is_accepted():
    model = tiny_model("bert")
    lsg_patch.to_lsg(model, max_length=64, **SMALL)
    assert model.embeddings.position_embeddings.weight.shape[0] == 64


def test_from_lsg_restores_the_original_model():
    model = tiny_model("bert", AutoModelForSequenceClassification)
    before = snapshot(model)
    ids = torch.randint(5, 90, (2, 30))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    lsg_patch.from_lsg(lsg_patch.to_lsg(model, max_length=512, **SMALL))
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_to_lsg_on_an_lsg_model_reconfigures_it():
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, **SMALL)
    globals_before = model.embeddings.global_embeddings.weight.detach().clone()
    lsg_patch.to_lsg(model, max_length=256, sparsity_type="pooling", num_global_tokens=3)
    assert model.config.sparsity_type == "pooling" and model.config.num_global_tokens == 3
    assert model.config.block_size == 4  # unchanged options are kept
    assert torch.equal(model.embeddings.global_embeddings.weight, globals_before)  # trained tokens kept
    assert model.embeddings.position_embeddings.weight.shape[0] == 256
    with torch.no_grad():
        assert model(input_ids=torch.randint(5, 90, (1, 200))).last_hidden_state.shape == (1, 200, 32)
    lsg_patch.from_lsg(model)
    assert model.embeddings.position_embeddings.weight.shape[0] == 64


def test_input_longer_than_max_length_gets_a_clear_error():
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=100, **SMALL)
    with pytest.raises(ValueError, match="101 tokens but this LSG model accepts at most 100"):
        model(input_ids=torch.randint(5, 90, (1, 101)))


def test_non_adaptive_model_refuses_lengths_off_the_block_grid():
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=100, adaptive=False, **SMALL)
    with pytest.raises(ValueError, match="30 tokens is not a multiple of block_size=4"):
        model(input_ids=torch.randint(5, 90, (1, 30)))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sparsity_type="nrom"), "sparsity_type='nrom' is not accepted \\(did you mean 'norm'\\?\\)"),
        (dict(block_sise=64), "unknown LSG option 'block_sise' \\(did you mean 'block_size'\\?\\)"),
        (dict(block_size=10, sparsity_factor=4), "block_size=10 is not a multiple of sparsity_factor=4"),
        (dict(num_global_tokens=0), "num_global_tokens=0 is not accepted: it must be between 1 and 512"),
        (dict(num_global_tokens=513), "num_global_tokens=513"),
        (dict(mask_first_token=True, pool_with_global=False), "mask_first_token=True needs pool_with_global=True"),
        (dict(adaptive="yes"), "adaptive='yes' is not accepted"),
        (dict(max_length=32), "max_length=32 is below the 64 positions"),
        (dict(global_positional_stride=48), "global_positional_stride=48 is not accepted"),
        (dict(bos_token_id=1000), "bos_token_id=1000"),
        (dict(sparsity_factor=0), "sparsity_factor=0 is not accepted: it must be at least 1"),
        (dict(tokenizer=42), "tokenizer=42 is not accepted: give a loaded transformers tokenizer"),
        (dict(tokenizer="path/to/tokenizer"), "tokenizer='path/to/tokenizer' is a path, not a tokenizer.*AutoTokenizer"),
        (dict(seed="a"), "seed='a' is not accepted: it must be an integer"),
        (dict(seed=-1), "seed=-1 is not accepted"),
    ],
)
def test_bad_options_raise_and_leave_the_model_unchanged(options, message):
    model = tiny_model("bert", AutoModelForMaskedLM)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        lsg_patch.to_lsg(model, **{"max_length": 128, **options})
    assert_unchanged(model, before)
    assert not lsg_patch.is_lsg_model(model)


def test_unsupported_models_are_named_with_the_supported_list():
    with pytest.raises(ValueError, match="model_type 'opt' .*Registered model types: .*bert.*roberta"):
        lsg_patch.to_lsg(OPTModel(OPTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                            word_embed_proj_dim=32)))
    with pytest.raises(ValueError, match="cannot convert a Linear.*supported model types"):
        lsg_patch.to_lsg(nn.Linear(2, 2))


def test_from_lsg_refuses_a_plain_model():
    with pytest.raises(ValueError, match="not an LSG model"):
        lsg_patch.from_lsg(tiny_model("bert"))


def test_caller_tensors_are_not_modified():
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, mask_first_token=True, **SMALL)
    ids = torch.randint(5, 90, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    ids_copy, mask_copy = ids.clone(), mask.clone()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert torch.equal(ids, ids_copy) and torch.equal(mask, mask_copy)


@settings(max_examples=12, deadline=None)
@given(
    model_type=st.sampled_from(BERT_FAMILY),
    sparsity_type=st.sampled_from(["none", "norm", "pooling", "stride", "block_stride", "bos_pooling"]),
    block_size=st.sampled_from([4, 8]),
    globals_count=st.integers(1, 3),
    lengths=st.one_of(
        st.lists(st.integers(17, 60), min_size=2, max_size=3),  # all rows on the block path
        st.lists(st.integers(2, 8), min_size=2, max_size=3),  # all rows on the full-attention path
    ),
    mask_first_token=st.booleans(),
)
def test_each_row_of_a_padded_batch_equals_that_row_alone(
    model_type, sparsity_type, block_size, globals_count, lengths, mask_first_token
):
    """Rows are independent as long as they take the same path: like the reference, a row of at most
    2*block_size tokens takes full attention alone but local blocks inside a longer batch."""
    model = tiny_model(model_type)
    lsg_patch.to_lsg(
        model, max_length=64, block_size=block_size, sparse_block_size=block_size, sparsity_factor=2,
        sparsity_type=sparsity_type, num_global_tokens=globals_count, mask_first_token=mask_first_token,
    )  # fmt: skip
    longest = max(lengths)
    ids = torch.randint(5, 90, (len(lengths), longest))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = model.config.pad_token_id or 0
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, length in enumerate(lengths):
            alone = model(input_ids=ids[row : row + 1, :length]).last_hidden_state
            assert (batched[row, :length] - alone[0]).abs().max().item() <= 1e-5


def test_deepcopy_keeps_the_patch():
    """A deep copy is an independent LSG model: same outputs, and its own global table (changing the copy's
    table changes the copy's outputs and leaves the original's alone)."""
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, **SMALL)
    twin = copy.deepcopy(model)
    assert lsg_patch.is_lsg_model(twin)
    ids = torch.randint(5, 90, (1, 50))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        assert torch.equal(twin(input_ids=ids).last_hidden_state, before)
        twin.embeddings.global_embeddings.weight.add_(1.0)
        assert not torch.equal(twin(input_ids=ids).last_hidden_state, before)  # the copy reads its own table
        assert torch.equal(model(input_ids=ids).last_hidden_state, before)  # and the original does not see it


def test_options_are_the_reference_names():
    assert set(option_names()) == {"block_size", "sparse_block_size", "sparsity_factor", "sparsity_type",
                                   "num_global_tokens", "mask_first_token", "pool_with_global", "adaptive",
                                   "lsh_num_pre_rounds", "pass_global_tokens_to_decoder"}  # fmt: skip
    chosen = dict(block_size=8, sparse_block_size=2, sparsity_factor=4, sparsity_type="stride", num_global_tokens=3,
                  mask_first_token=True, pool_with_global=True, adaptive=False, lsh_num_pre_rounds=2)
    model = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, **chosen)
    assert {name: getattr(model.config, name) for name in chosen} == chosen  # stored under the reference's names


def test_random_global_init_is_seeded():
    first = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, random_global_init=True, seed=3, **SMALL)
    again = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, random_global_init=True, seed=3, **SMALL)
    other = lsg_patch.to_lsg(tiny_model("bert"), max_length=128, random_global_init=True, seed=4, **SMALL)
    table = first.embeddings.global_embeddings.weight
    assert torch.equal(table, again.embeddings.global_embeddings.weight)
    assert not torch.equal(table, other.embeddings.global_embeddings.weight)


def test_position_only_initialisation_without_any_token_ids(caplog):
    caplog.set_level("INFO", logger="lsg_patch")
    model = tiny_model("bert")
    positions = model.embeddings.position_embeddings.weight.detach().clone()
    token_type = model.embeddings.token_type_embeddings.weight.detach()[0]
    lsg_patch.to_lsg(model, max_length=128, **SMALL)
    assert "seeded from position vectors, token ids from no tokenizer (none given, none saved with the model)" in caplog.text
    table = model.embeddings.global_embeddings.weight.detach()
    assert torch.allclose(table[0], positions[0] + token_type) and torch.allclose(table[8], positions[1] + token_type)


def test_the_tokenizer_given_is_raised_to_max_length():
    """Else the user's next tokenizer(text, truncation=True) silently cuts at the old 512."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    assert tokenizer.model_max_length == 512
    model = tiny_model("bert", vocab_size=tokenizer.vocab_size)
    lsg_patch.to_lsg(model, max_length=1024, tokenizer=tokenizer, **SMALL)
    assert tokenizer.model_max_length == 1024
    assert len(tokenizer("word " * 2000, truncation=True)["input_ids"]) == 1024
    lsg_patch.to_lsg(model, max_length=2048, tokenizer=tokenizer)  # re-configuring raises it again
    assert tokenizer.model_max_length == 2048 and tokenizer.init_kwargs["model_max_length"] == 2048


def test_a_failed_to_lsg_leaves_the_tokenizer_as_it_was():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    with pytest.raises(ValueError, match="sparsity_type='nrom'"):
        lsg_patch.to_lsg(tiny_model("bert", vocab_size=tokenizer.vocab_size), max_length=1024, tokenizer=tokenizer,
                         sparsity_type="nrom")  # fmt: skip
    assert tokenizer.model_max_length == 512


def test_an_lsg_checkpoint_loaded_by_plain_transformers_is_refused_with_how_to_load_it(tmp_path):
    """Plain transformers drops the trained global tokens; converting again would also reset the saved settings."""
    model = tiny_model("bert", AutoModelForMaskedLM)
    lsg_patch.to_lsg(model, max_length=256, block_size=16, sparsity_type="pooling", num_global_tokens=4, **IDS)
    model.save_pretrained(tmp_path)
    plain = AutoModelForMaskedLM.from_pretrained(tmp_path)
    before = snapshot(plain)
    with pytest.raises(ValueError, match="loaded from an LSG checkpoint .*block_size=16, sparsity_type='pooling', "
                       "num_global_tokens=4.* lsg_patch.from_pretrained.*lsg_patch.enabled"):  # fmt: skip
        lsg_patch.to_lsg(plain, max_length=512)
    assert_unchanged(plain, before)
    reloaded = lsg_patch.from_pretrained(tmp_path)
    assert torch.equal(reloaded.bert.embeddings.global_embeddings.weight, model.bert.embeddings.global_embeddings.weight)
    lsg_patch.to_lsg(reloaded, max_length=512)  # the supported way: settings and global tokens kept
    assert (reloaded.config.block_size, reloaded.config.sparsity_type, reloaded.config.num_global_tokens) == (16, "pooling", 4)
