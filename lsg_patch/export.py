"""Export a converted model: one `torch.export` program, or one ONNX graph, for every batch size and length.

    program = lsg_patch.export.export_program(model)               # torch.export.ExportedProgram
    lsg_patch.export_onnx("minilm-lsg", "minilm-onnx")              # OUT/model.onnx + config + tokenizer
    lsg-patch export minilm-lsg minilm-onnx                         # the same from a shell

Under torch.export the family hooks pad every input to whole blocks and the product always takes the block path
(`attention.backends.Kernel.EXPORTABLE`), which equals the full path on inputs of at most two blocks; no branch
depends on the length, so one graph serves lengths 1..max_length. The symbolic block count can be 1, so export runs
with torch's size-oblivious reasoning about sizes (`backed_size_oblivious`), which keeps it from specialising there.

A sentence-transformers folder also gets `sentence_embedding.onnx`: the transformer, then the folder's pooling and
normalisation, so onnxruntime alone turns token ids into sentence embeddings.

Refused, with the reason: models in training mode, generation with the LSGCache (the exported forward has no cache),
adaptive=False (whose length check an exported graph cannot make), and types and options the exportable path cannot
express (`EXPORT_REFUSALS`).
"""
from __future__ import annotations

import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

ONNX_FILE = "model.onnx"
SENTENCE_FILE = "sentence_embedding.onnx"
OPSET = 18
EXAMPLE_BATCH = 2
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# sparsity types whose sparse keys cannot be traced into a graph, with the reason
EXPORT_REFUSALS = {
    "lsh": "its per-chunk hashing does not trace with a dynamic length (torch.export specialises the graph on the "
           "length it was traced with); convert with another sparsity_type (norm, pooling, bos_pooling, stride, "
           "block_stride, none) to export",
}


def export_program(model: nn.Module, *, example_length: int | None = None, inputs: tuple[str, ...] | None = None,
                   **forward_kwargs: Any) -> torch.export.ExportedProgram:
    """torch.export of a converted model's forward (inputs_ids, attention_mask[, token_type_ids]), batch and length
    dynamic (1 up to the model's max_length). forward_kwargs are fixed arguments of every call (use_cache=False is
    set for models that take it). The program returns the model's output tensors in order (`output_names`)."""
    wrapper, example, dynamic = _traceable(model, example_length, inputs, forward_kwargs)
    with _size_oblivious():
        return torch.export.export(wrapper, (), example, dynamic_shapes=dynamic, strict=False)


def export_onnx(model_or_path: Any, out_dir: str | Path, *, max_length: int | None = None, tokenizer: Any = None,
                opset: int = OPSET, overwrite: bool = False, **lsg_options: Any) -> Path:
    """Write OUT/model.onnx (dynamic batch and length), the config and the tokenizer; for a sentence-transformers
    folder or model also OUT/sentence_embedding.onnx. model_or_path: a converted model, a SentenceTransformer, or a
    folder: an LSG checkpoint, or a plain one converted with `max_length` (and lsg_options) first, as `lsg-patch
    convert` does. Returns the output folder."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"the output folder {str(out)!r} already exists and is not empty; pass overwrite=True "
                         "(--overwrite) to replace it")
    model, tokenizer, sentence = _loaded(model_or_path, max_length, tokenizer, lsg_options)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_onnx(model, staging / ONNX_FILE, opset)
        if sentence is not None:
            _write_onnx(SentenceEmbedding(sentence).eval(), staging / SENTENCE_FILE, opset)
        model.config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


class SentenceEmbedding(nn.Module):
    """A SentenceTransformer's forward from token ids to its `sentence_embedding` (its pooling and normalisation
    included), as a plain module an exporter can trace."""

    def __init__(self, sentence: nn.Module) -> None:
        super().__init__()
        self.sentence = sentence

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        return self.sentence(features)["sentence_embedding"]


class _TensorOutputs(nn.Module):
    """A model's forward with named token inputs and fixed keyword arguments, returning its output tensors as a
    tuple (exporters take tensors, not ModelOutput objects)."""

    def __init__(self, model: nn.Module, fixed: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.fixed = fixed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        given = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            given["token_type_ids"] = token_type_ids
        output = self.model(**given, **self.fixed)
        if isinstance(output, torch.Tensor):
            return (output,)
        return tuple(value for value in output.values() if isinstance(value, torch.Tensor))


def output_names(model: nn.Module, **forward_kwargs: Any) -> list[str]:
    """The names of the tensors `export_program` / model.onnx return for `model` (e.g. last_hidden_state,
    pooler_output; logits), read from one short call."""
    wrapper, example, _ = _traceable(model, None, None, forward_kwargs)
    with torch.no_grad():
        output = wrapper.model(**{k: v[:1, :8] for k, v in example.items()}, **wrapper.fixed)
    if isinstance(output, torch.Tensor):
        return ["output"]
    return [name for name, value in output.items() if isinstance(value, torch.Tensor)]


def check_exportable(model: nn.Module) -> None:
    """Raise a ValueError naming why `model` cannot be exported, before anything is traced."""
    from .swap import is_lsg_model

    inner = _transformers_model(model)
    if not is_lsg_model(inner):
        raise ValueError(f"{type(inner).__name__} is not an LSG model: convert it with lsg_patch.to_lsg (or pass "
                         "max_length to export a plain checkpoint) before exporting")
    if model.training or inner.training:
        raise ValueError("the model is in training mode (dropout would be exported as a random op, and LSG attention "
                         "dropout cannot be): call model.eval() before exporting")
    config = inner.config
    reason = EXPORT_REFUSALS.get(config.sparsity_type)
    if reason is not None and config.sparse_block_size > 0 and config.sparsity_factor > 1:
        raise ValueError(f"sparsity_type={config.sparsity_type!r} cannot be exported: {reason}")
    if not config.adaptive:
        raise ValueError("a model converted with adaptive=False refuses lengths that are not whole blocks, which an "
                         "exported graph cannot check: convert with adaptive=True to export it")


def _traceable(model: nn.Module, example_length: int | None, inputs: tuple[str, ...] | None,
               forward_kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """The module to trace, example inputs (a padded batch longer than two blocks) and their dynamic dims."""
    check_exportable(model)
    inner = _transformers_model(model)
    config = inner.config
    max_length = _max_length(inner)
    inputs = _inputs_of(inner) if inputs is None else inputs
    if isinstance(model, SentenceEmbedding):
        wrapper: nn.Module = model
    else:
        fixed = dict(forward_kwargs)
        if "use_cache" in inspect.signature(model.forward).parameters:
            fixed.setdefault("use_cache", False)
        wrapper = _TensorOutputs(model, fixed)
    length = example_length or min(max_length, 3 * config.block_size + config.block_size // 2 + 1)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, min(config.vocab_size, 1000)), (EXAMPLE_BATCH, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    example = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "token_type_ids" in inputs:
        example["token_type_ids"] = torch.zeros_like(ids).to(device)
    batch = torch.export.Dim("batch", min=1)
    tokens = torch.export.Dim("length", min=1, max=max_length)
    return wrapper, example, {name: {0: batch, 1: tokens} for name in example}


def _write_onnx(model: nn.Module, path: Path, opset: int) -> None:
    """The ONNX graph of `model` (see `_traceable`), with named inputs and outputs and dynamic batch and length."""
    wrapper, example, dynamic = _traceable(model, None, None, {})
    names = ["sentence_embedding"] if isinstance(model, SentenceEmbedding) else output_names(model)
    with _size_oblivious(), torch.no_grad():
        program = torch.onnx.export(wrapper, (), kwargs=example, dynamic_shapes=dynamic, dynamo=True,
                                    input_names=list(example), output_names=names, opset_version=opset,
                                    custom_translation_table=_onnx_translations(), optimize=True, verbose=False)
    program.save(str(path))


def _onnx_translations() -> dict[Any, Any]:
    """ONNX translations of the aten ops the exporter has none for: the stable sort of the norm selection (ONNX TopK
    over the whole dimension breaks ties by the lower index, which is a stable sort)."""
    from onnxscript import opset18 as op

    def stable_sort(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False) -> Any:
        count = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]))
        return op.TopK(self, count, axis=dim, largest=int(descending), sorted=1)

    return {torch.ops.aten.sort.stable: stable_sort}


def _loaded(source: Any, max_length: int | None, tokenizer: Any, lsg_options: dict[str, Any]
            ) -> tuple[nn.Module, Any, nn.Module | None]:
    """(the transformers model, its tokenizer, the SentenceTransformer or None) from what export_onnx was given."""
    from .sentence import transformer_modules

    if isinstance(source, (str, Path)):
        return _load_folder(Path(source), max_length, tokenizer, lsg_options)
    if max_length is not None or lsg_options:
        from .api import to_lsg

        source = to_lsg(source, max_length=max_length, **lsg_options)
    modules = transformer_modules(source)
    if modules is not None:
        if len(modules) != 1:
            raise ValueError(f"this SentenceTransformer has {len(modules)} Transformer modules; export takes one")
        return modules[0].auto_model.eval(), tokenizer or getattr(modules[0], "tokenizer", None), source.eval()
    return source, tokenizer, None


def _load_folder(folder: Path, max_length: int | None, tokenizer: Any, lsg_options: dict[str, Any]
                 ) -> tuple[nn.Module, Any, nn.Module | None]:
    """Load an LSG or plain folder (plain: converted to max_length), as `lsg-patch convert` reads it."""
    from transformers import AutoConfig, AutoTokenizer

    from .api import to_lsg
    from .context import enabled
    from .persistence import check_checkpoint_folder, model_class_for, saved_settings
    from .sentence import MODULES_FILE, transformer_folder

    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist")
    model_folder = transformer_folder(folder) or folder
    check_checkpoint_folder(str(model_folder))
    config = AutoConfig.from_pretrained(model_folder, trust_remote_code=False)
    is_lsg = saved_settings(config) is not None
    if not is_lsg and max_length is None:
        raise ValueError(f"{folder} is a plain checkpoint: give max_length (--max-length) to convert it before "
                         "exporting, or export a folder written by `lsg-patch convert`")
    if (folder / MODULES_FILE).is_file():
        from sentence_transformers import SentenceTransformer

        with enabled():
            sentence = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        if not is_lsg or max_length is not None or lsg_options:
            to_lsg(sentence, max_length=max_length or sentence.max_seq_length, **lsg_options)
        return _loaded(sentence, None, tokenizer, {})
    with enabled():
        model = model_class_for(config, None).from_pretrained(model_folder)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_folder)
        except (OSError, ValueError, TypeError, KeyError):
            tokenizer = None
    if not is_lsg or max_length is not None or lsg_options:
        to_lsg(model, max_length=max_length, tokenizer=tokenizer, **lsg_options)  # None: keeps the current one
    return model.eval(), tokenizer, None


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a SentenceEmbedding / SentenceTransformer, or the model itself."""
    from .sentence import transformer_modules

    if isinstance(model, SentenceEmbedding):
        model = model.sentence
    modules = transformer_modules(model)
    return modules[0].auto_model if modules else model


def _inputs_of(model: nn.Module) -> tuple[str, ...]:
    """The token inputs the exported graph takes: input_ids, attention_mask, and token_type_ids when the model has
    more than one token type (BERT-likes)."""
    inner = _transformers_model(model)
    accepts = inspect.signature(inner.forward).parameters
    types = getattr(inner.config, "type_vocab_size", 0) or 0
    return TOKEN_INPUTS if "token_type_ids" in accepts and types > 1 else TOKEN_INPUTS[:2]


def _max_length(model: nn.Module) -> int:
    """The length the converted model accepts (what the length dimension ranges up to), from its patch record."""
    from .swap import record_of

    record = record_of(_transformers_model(model))
    if record is None:
        raise ValueError(f"{type(model).__name__} is not an LSG model: convert it with lsg_patch.to_lsg first")
    return record.max_length


def _size_oblivious() -> Any:
    """torch's size-oblivious reasoning about backed sizes: a symbolic block count may be 1 without the tracer
    specialising the graph on it."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(backed_size_oblivious=True)
