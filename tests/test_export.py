"""Export (issue 21): one torch.export program per converted model, with dynamic batch and length, equal to the eager
model at every length (below and above two blocks, whole blocks or not, padded rows); ONNX graphs that onnxruntime
runs; sentence embeddings out of one graph; clear refusals for what cannot be exported."""
from __future__ import annotations

import inspect
import io
import json

import numpy as np
import pytest
import torch

import lsg_patch
from lsg_patch.attention.backends import AttentionCall, Kernel, choose_kernel
from lsg_patch.export import EXPORT_REFUSALS, export_program
from tests.tiny_models import build

ort = pytest.importorskip("onnxruntime")

LSG = dict(block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type="norm", num_global_tokens=2)
MAX_LENGTH = 128
# 1 and 9 tokens: one and two blocks (the eager model takes full attention there); 16: two whole blocks; 17, 33, 75:
# more than two blocks, not whole; 128: max_length
LENGTHS = (1, 9, 16, 17, 33, 75, 128)
MODELS = [("bert", "Model"), ("gte", "Model"), ("modernbert", "Model"), ("t5", "EncoderModel"),
          ("llama", "ForCausalLM"), ("gpt2", "LMHeadModel")]


def padded_batch(length: int, vocab: int = 99) -> dict[str, torch.Tensor]:
    """3 rows: full, right-padded, left-padded (for causal models: moved behind the real tokens)."""
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(5, vocab, (3, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, (length + 1) // 2:] = 0
    mask[2, :length // 3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def eager(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    fixed = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        return model(**batch, **fixed)[0]


def assert_program_matches_eager(model: torch.nn.Module, lengths: tuple[int, ...] = LENGTHS) -> None:
    program = export_program(model).module()
    types = (getattr(model.config, "type_vocab_size", 0) or 0) > 1  # then the graph takes token_type_ids too
    for length in lengths:
        batch = padded_batch(length)
        if types:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        with torch.no_grad():
            got = program(**batch)[0]
        torch.testing.assert_close(got, eager(model, batch), rtol=0, atol=1e-5, msg=f"at {length} tokens")


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "head"), MODELS)
def test_one_exported_program_equals_the_eager_model_at_every_length(model_type: str, head: str) -> None:
    assert_program_matches_eager(lsg_patch.to_lsg(build(model_type, head), max_length=MAX_LENGTH, **LSG))


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    dict(sparsity_type="pooling"), dict(sparsity_type="bos_pooling"), dict(sparsity_type="stride"),
    dict(sparsity_type="block_stride"), dict(sparsity_type="none"), dict(mask_first_token=True),
    # an odd sparse step (24 / 8 = 3): its after window reaches into the local window, also at <= 2 blocks
    dict(block_size=24, sparsity_factor=8, sparse_block_size=8),
])
def test_sparsity_types_and_options_export(options: dict) -> None:
    model = lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **{**LSG, **options})
    assert_program_matches_eager(model, (9, 40, 75))


def test_the_exported_graph_holds_no_length_by_length_tensor() -> None:
    """No intermediate that is used has two dimensions that grow with the length (a dense (n, n) mask or score
    matrix). transformers' mask code leaves one unused (n, n) expand view in the trace (dropped by the ONNX export's
    dead-code elimination); it computes nothing."""
    program = export_program(lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG))
    nodes = list(program.graph.nodes)
    ids = next(node for node in nodes if node.op == "placeholder" and node.name.endswith("input_ids"))
    length = next(iter(ids.meta["val"].shape[1].node.expr.free_symbols))
    for node in nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and node.users:
            grows = [size for size in value.shape
                     if isinstance(size, torch.SymInt) and length in size.node.expr.free_symbols]
            assert len(grows) < 2, f"{node.format_node()} has shape {tuple(value.shape)}"


@pytest.mark.slow
def test_onnx_from_a_plain_folder_runs_in_onnxruntime(tmp_path) -> None:  # noqa: ANN001
    """`lsg-patch export SRC OUT --max-length` on a plain folder: model.onnx with dynamic batch and length, and the
    config; onnxruntime gives the PyTorch outputs of the same conversion within 1e-4, padded rows included."""
    from lsg_patch.cli import main

    plain = build("bert", "Model")
    plain.save_pretrained(tmp_path / "plain")
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "onnx"), "--max-length", str(MAX_LENGTH),
                 "--block-size", "8", "--sparse-block-size", "8", "--num-global-tokens", "2"]) == 0
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert (config["block_size"], config["num_global_tokens"]) == (8, 2)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    model = lsg_patch.to_lsg(type(plain).from_pretrained(tmp_path / "plain").eval(), max_length=MAX_LENGTH,
                             block_size=8, sparse_block_size=8, num_global_tokens=2)  # the conversion export made
    for length in (5, 16, 33, 75, 128):
        batch = padded_batch(length)
        got = session.run(None, {**{k: v.numpy() for k, v in batch.items()},
                                 "token_type_ids": np.zeros((3, length), dtype=np.int64)})[0]
        np.testing.assert_allclose(got, eager(model, batch).numpy(), rtol=0, atol=1e-4, err_msg=f"{length} tokens")


@pytest.mark.slow
def test_sentence_transformers_folder_gets_a_sentence_embedding_graph(tmp_path) -> None:  # noqa: ANN001
    """The MiniLM folder (plain, 512 positions) exported at 2048 tokens: sentence_embedding.onnx, run by onnxruntime
    alone on long texts, equals SentenceTransformer.encode of the same conversion within 1e-4."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from lsg_patch.demo import PARAGRAPH, minilm_path

    out = lsg_patch.export_onnx(minilm_path(), tmp_path / "onnx", max_length=2048)
    assert {"model.onnx", "sentence_embedding.onnx", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    reference = lsg_patch.to_lsg(sentence_transformers.SentenceTransformer(minilm_path(), device="cpu"),
                                 max_length=2048)
    texts = [PARAGRAPH * 25, "A short one.", PARAGRAPH * 7]
    expected = reference.encode(texts, convert_to_numpy=True)
    tokens = reference.tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    assert tokens["input_ids"].shape[1] > 1024  # long texts, in a padded batch
    session = ort.InferenceSession(str(out / "sentence_embedding.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: tokens[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_generation_with_the_lsg_cache_is_refused() -> None:
    model = lsg_patch.to_lsg(build("llama", "ForCausalLM"), max_length=MAX_LENGTH, **LSG)
    with pytest.raises(Exception, match="generation with the LSGCache cannot be exported"):
        export_program(model, use_cache=True)


@pytest.mark.parametrize("options", [dict(sparsity_type="lsh"), dict(adaptive=False)])
def test_options_that_cannot_be_expressed_are_refused_with_the_reason(options: dict) -> None:
    model = lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **{**LSG, **options})
    reason = EXPORT_REFUSALS["lsh"][:40] if "sparsity_type" in options else "adaptive=False"
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        export_program(model)


def test_training_mode_and_plain_models_are_refused() -> None:
    with pytest.raises(ValueError, match="not an LSG model"):
        export_program(build("bert", "Model"))
    model = lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG).train()
    with pytest.raises(ValueError, match="training mode"):
        export_program(model)


def test_export_takes_the_exportable_kernel_from_the_one_kernel_choice() -> None:
    cpu = torch.device("cpu")
    for block_path in (False, True):  # under export the hooks always give the block path; the choice is the same
        assert choose_kernel(AttentionCall(cpu, block_path, exporting=True)).kernel is Kernel.EXPORTABLE
    with pytest.raises(ValueError, match="attention dropout cannot be exported"):
        choose_kernel(AttentionCall(cpu, True, dropout=True, exporting=True))
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        choose_kernel(AttentionCall(cpu, True, jit_tracing=True))


def test_jit_trace_is_refused_pointing_to_torch_export() -> None:
    """It used to fail inside the product with RuntimeError: unordered_map::at; the legacy ONNX exporter traces the
    same way."""
    model = lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG)
    batch = padded_batch(40)
    with pytest.raises(RuntimeError, match="torch.jit.trace .* Use torch.export.export"):
        torch.jit.trace(model, (batch["input_ids"], batch["attention_mask"]), strict=False)
    with pytest.raises(Exception, match="torch.jit.trace"):
        torch.onnx.export(Positional(model), (batch["input_ids"], batch["attention_mask"]), io.BytesIO(), dynamo=False)


class Positional(torch.nn.Module):
    """model(input_ids, attention_mask) -> last_hidden_state, for the legacy exporter."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
