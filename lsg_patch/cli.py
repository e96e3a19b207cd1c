"""`lsg-patch`: the public LSG converter's job from a shell, and a look inside checkpoints.

    lsg-patch convert path/to/model out/dir --max-length 4096 --architecture RobertaForSequenceClassification \
        --lsg '{"sparsity_type": "lsh", "block_size": 32}'
    lsg-patch info out/dir
    lsg-patch export out/dir out/onnx                            # OUT/model.onnx for onnxruntime
    lsg-patch run --max-length 4096 -- python train.py ARGS     # a script that knows nothing of lsg_patch

Bad input ends the command with one line on stderr and exit status 1 (2 for unusable command-line syntax);
the output folder is written under a temporary name next to it and moved in place only once complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .config import SPARSITY_TYPES, LSGConfig, option_names
from .checkpoint_info import checkpoint_report
from .options import DEFAULT_MAX_LENGTH, SEEDING_DEFAULTS, ConversionOptions
from .persistence import check_checkpoint_folder, saved_settings
from .sentence import MODULES_FILE, copy_sentence_modules, set_tokenizer_length, transformer_folder

PROG = "lsg-patch"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # what could be a model id rather than a path
DTYPES = ("auto", "float32", "float16", "bfloat16")
OPTION_HELP = {
    "block_size": "local block size: each query block attends to its own and the two neighbouring key blocks",
    "sparse_block_size": "number of sparse keys taken before and after the local window (0: no sparse keys)",
    "sparsity_factor": "how many tokens the sparse selection reduces to one (block_size must be a multiple)",
    "sparsity_type": "sparse key selection",
    "num_global_tokens": "global tokens prepended to every input (1..512)",
    "mask_first_token": "mask the first token (its role is taken by the first global token)",
    "pool_with_global": "output the first global token in place of the first token (what poolers read)",
    "adaptive": "pad inputs that are not a multiple of block_size (else such inputs raise)",
    "lsh_num_pre_rounds": "pre-rounds of the lsh sparse selection",
    "pass_global_tokens_to_decoder": "encoder-decoder models: let the decoder attend to the global tokens",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Convert checkpoints to LSG attention and inspect them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    convert = commands.add_parser(
        "convert", help="convert a model folder or id to its LSG variant and save it (model + tokenizer)",
        description="Convert a checkpoint to LSG: extend positions, initialise global tokens, save. "
        "LSG options may be given as flags or as a JSON object with --lsg (not both for one option).",
    )  # fmt: skip
    convert.add_argument("input", help="model folder (or hub id) to convert; a plain or an LSG checkpoint")
    convert.add_argument("output", help="folder to write the LSG checkpoint to (must not exist unless --overwrite)")
    convert.add_argument("--max-length", type=int, default=None,
                         help=f"number of tokens the converted model accepts (default: {DEFAULT_MAX_LENGTH} for a plain "
                         "input, the saved length for an LSG input)")  # fmt: skip
    convert.add_argument("--architecture", help="transformers class to load and save, e.g. BertForMaskedLM "
                         "(an LSG name such as LSGBertForMaskedLM is accepted); default: the config's architecture")  # fmt: skip
    convert.add_argument("--lsg", metavar="JSON", default=None,
                         help='LSG options as a JSON object, e.g. \'{"sparsity_type": "lsh", "block_size": 32}\'')  # fmt: skip
    _add_lsg_flags(convert.add_argument_group("LSG options (default: the reference defaults, or the input's own settings)"))
    init = convert.add_argument_group(
        "global tokens (an LSG input keeps its trained ones, as to_lsg does, unless --reinitialize-global-tokens)")
    _add_seeding_flags(init)
    init.add_argument("--reinitialize-global-tokens", action="store_true",
                      help="LSG input only: seed new global tokens (as for a plain input) instead of keeping the trained ones")  # fmt: skip
    init.add_argument("--keep-first-global-token", action="store_true",
                      help="with --reinitialize-global-tokens: keep the trained first global token")  # fmt: skip
    convert.add_argument("--dtype", choices=DTYPES, default="auto",
                         help="dtype to load and save the model in (default: auto, as saved)")  # fmt: skip
    convert.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    convert.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="show progress bars (default: when stderr is a terminal)")  # fmt: skip

    info = commands.add_parser("info", help="tell whether a checkpoint folder is LSG and with what settings",
                               description="Read a checkpoint folder's config and weight names (no weights are loaded).")  # fmt: skip
    info.add_argument("path", help="checkpoint folder")
    info.add_argument("--json", action="store_true", help="print the report as one JSON object")

    run = commands.add_parser(
        "run", help="run a command (python script.py ...) with lsg_patch.enabled() active in its Python processes",
        description="Run COMMAND so that every Python process it starts has lsg_patch.enabled() active from its "
        "first line: from_pretrained returns LSG models for LSG checkpoints and, with --max-length, converts plain "
        "ones. Put the command after --, e.g. lsg-patch run --max-length 4096 -- python train.py --epochs 1",
    )  # fmt: skip
    run.add_argument("--max-length", type=int, default=None,
                     help="convert plain checkpoints to this many tokens on load (default: load them unchanged)")  # fmt: skip
    _add_lsg_flags(run.add_argument_group("LSG options for plain checkpoints converted on load"))
    _add_seeding_flags(run.add_argument_group("global tokens of plain checkpoints converted on load"))
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command to run, after --")
    _add_export_command(commands)
    return parser


def _add_lsg_flags(group: Any) -> None:
    """One flag per LSGConfig field (--block-size N, --sparsity-type T, --adaptive/--no-adaptive, ...)."""
    for field in dataclasses.fields(LSGConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=OPTION_HELP[field.name])  # fmt: skip
        elif field.name == "sparsity_type":
            group.add_argument(flag, dest=field.name, choices=SPARSITY_TYPES, default=None,
                               help=OPTION_HELP[field.name])  # fmt: skip
        else:
            group.add_argument(flag, dest=field.name, type=int, default=None, metavar="N", help=OPTION_HELP[field.name])


def _add_seeding_flags(group: Any) -> None:
    """The seeding options that have flags (bos/mask ids come from the tokenizer saved with the checkpoint)."""
    group.add_argument("--random-global-init", action="store_true", default=None,
                       help="draw global tokens from the word-embedding distribution instead of the mask token")  # fmt: skip
    group.add_argument("--global-positional-stride", type=int, default=None, metavar="N",
                       help="stride between the positions global tokens are seeded from "
                       f"(default {SEEDING_DEFAULTS['global_positional_stride']})")  # fmt: skip
    group.add_argument("--seed", type=int, default=None,
                       help=f"seed of the random parts of the initialisation (default {SEEDING_DEFAULTS['seed']})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            convert(args)
        elif args.command == "run":
            run(args)
        elif args.command == "export":
            export(args)
        else:
            info(args)
    except (ValueError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{PROG}: error: {reason}", file=sys.stderr)
        return 1
    return 0


# --- convert ----------------------------------------------------------------------------------------------


SEEDING_FLAGS = ("random_global_init", "global_positional_stride", "seed")


def conversion_options(args: argparse.Namespace) -> ConversionOptions:
    """The options given as flags and in --lsg (an option given both ways, or an unknown name, raises)."""
    flags = {name: getattr(args, name) for name in (*option_names(), *SEEDING_FLAGS)
             if getattr(args, name, None) is not None}  # export has no seeding flags
    parsed: dict[str, Any] = {}
    if args.lsg is not None:
        try:
            parsed = json.loads(args.lsg)
        except json.JSONDecodeError:
            try:  # the reference's --model_kwargs accepted single quotes
                parsed = json.loads(args.lsg.replace("'", '"'))
            except json.JSONDecodeError as error:
                raise ValueError(f"--lsg is not valid JSON ({error.msg} at character {error.pos}): {args.lsg}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"--lsg must be a JSON object of LSG options, got {type(parsed).__name__}: {args.lsg}")
        unknown = sorted(set(parsed) - set(option_names()))
        if unknown:
            ConversionOptions.from_mapping({unknown[0]: parsed[unknown[0]]})  # unknown names raise, with a suggestion
            raise ValueError(f"--lsg takes the LSG options only ({', '.join(option_names())}); {unknown[0]} is not one")
        both = sorted(set(parsed) & set(flags))
        if both:
            raise ValueError(f"{both[0]} is given both in --lsg and as --{both[0].replace('_', '-')}; give it once")
    return ConversionOptions.from_mapping({**parsed, **flags, "max_length": args.max_length})


def convert(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .api import convert_with_options
    from .context import enabled
    from .persistence import model_class_for
    from .registry_paths import get_submodule
    from .swap import GLOBAL_EMBEDDINGS, record_of, revert

    options = conversion_options(args)
    output = Path(args.output)
    source = _model_folder(args.input)  # the Transformer module's folder for a sentence-transformers folder
    _check_input(source)
    _check_output(Path(args.input), output, args.overwrite)
    progress = _progress_bar(args.progress, ["read", "load", "convert", "save"])
    if progress.disable:
        hf_logging.disable_progress_bar()

    _say(f"reading {source}")
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    saved = saved_settings(config)
    settings = options.settings(saved)  # every option validated before any weight is read
    _check_modes(args, options, saved is not None)
    model_class = model_class_for(config, args.architecture)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    progress.update()

    kind = "LSG" if saved is not None else "plain"
    _say(f"loading the {kind} {config.model_type} checkpoint as {model_class.__name__} (dtype {args.dtype})")
    if saved is not None:
        with enabled():
            model = model_class.from_pretrained(source, dtype=dtype)
    else:
        model = model_class.from_pretrained(source, dtype=dtype)
    tokenizer = _tokenizer(AutoTokenizer, source)
    before = sum(p.numel() for p in model.parameters())
    progress.update()

    first = None
    if args.reinitialize_global_tokens:
        loaded = record_of(model)
        table = getattr(get_submodule(getattr(model, "base_model", model), loaded.entry.global_embeddings_parent),
                        GLOBAL_EMBEDDINGS)  # fmt: skip
        first = table.weight.detach()[0].clone() if args.keep_first_global_token else None
        _say("re-initialising the global tokens of the LSG input" + (" (first one kept)" if first is not None else ""))
        revert(model)  # the saved settings and length stay the base of the new conversion
        options = options.over(ConversionOptions(max_length=loaded.max_length, **dataclasses.asdict(loaded.lsg)))
    elif saved is not None:
        _say("re-configuring the LSG input; its trained global tokens are kept")
    _say(f"converting to LSG: {settings}")
    convert_with_options(model, options, tokenizer)
    record = record_of(model)
    if first is not None:
        table = getattr(get_submodule(getattr(model, "base_model", model), record.entry.global_embeddings_parent),
                        GLOBAL_EMBEDDINGS)  # fmt: skip
        with torch.no_grad():
            table.weight[0] = first
    after = sum(p.numel() for p in model.parameters())
    progress.update()

    _say(f"saving to {output}")
    kept = _save(model, tokenizer, record.max_length, output, args.overwrite, Path(args.input), source)
    progress.update()
    progress.close()
    if kept:
        _say(f"sentence-transformers folder: kept {', '.join(kept)} (max_seq_length {record.max_length})")
    print(f"{PROG}: done: {record.model_type} {type(model).__name__}, max length {record.max_length}, "
          f"{after - before:+,} parameters ({before:,} -> {after:,}), {model.config.sparsity_type} sparsity, "
          f"block {model.config.block_size}, {model.config.num_global_tokens} global token(s)"
          + ("" if tokenizer is not None else "; no tokenizer found in the input, only the model was saved"))  # fmt: skip


def _model_folder(source: str) -> str:
    """The folder (or hub id) of the transformers checkpoint: `source`, or for a sentence-transformers folder the
    folder of its Transformer module (modules.json says where)."""
    if not os.path.isdir(source):
        return source
    folder = transformer_folder(Path(source))
    return source if folder is None else str(folder)


def _progress_bar(show: bool | None, steps: list[str]) -> Any:
    """A tqdm bar over the convert steps (transformers' own bars show the weights loaded and written inside them);
    shown when asked, or by default when stderr is a terminal."""
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if show is None else not show
    return tqdm(total=len(steps), desc=f"{PROG} convert", unit="step", disable=disable, file=sys.stderr)


def _check_modes(args: argparse.Namespace, options: ConversionOptions, input_is_lsg: bool) -> None:
    """Flags that only mean something for one kind of input are refused for the other, before any weight is read."""
    if not input_is_lsg:
        for flag, given in (("--reinitialize-global-tokens", args.reinitialize_global_tokens),
                            ("--keep-first-global-token", args.keep_first_global_token)):  # fmt: skip
            if given:
                raise ValueError(f"{flag} needs an LSG input, but {args.input} is a plain checkpoint")
        return
    if args.keep_first_global_token and not args.reinitialize_global_tokens:
        raise ValueError("--keep-first-global-token needs --reinitialize-global-tokens (without it every trained "
                         "global token is kept)")  # fmt: skip
    if options.seeding_given() and not args.reinitialize_global_tokens:
        flag = "--" + next(iter(options.seeding_given())).replace("_", "-")
        raise ValueError(f"{flag} seeds new global tokens, but {args.input} is an LSG checkpoint whose trained global "
                         "tokens are kept; add --reinitialize-global-tokens to seed new ones")  # fmt: skip


def _check_input(source: str) -> None:
    if os.path.exists(source):
        check_checkpoint_folder(source)
    elif not HUB_ID.match(source):
        raise ValueError(f"checkpoint folder {source!r} does not exist")


def _check_output(source: Path, output: Path, overwrite: bool) -> None:
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise ValueError(f"the output folder {str(output)!r} is the input folder; give another output folder")
    if output.exists() and not output.is_dir():
        raise ValueError(f"the output {str(output)!r} is a file, not a folder")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"the output folder {str(output)!r} already exists and is not empty; pass --overwrite to replace it")


def _tokenizer(auto_tokenizer: Any, source: str) -> Any:
    try:
        return auto_tokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError):  # no (usable) tokenizer files: the model is saved alone
        return None


def _save(model: Any, tokenizer: Any, max_length: int, output: Path, overwrite: bool, source: Path,
          model_folder: str) -> list[str]:
    """Write into a temporary folder next to `output`, then move it in place (nothing half-written is left).

    A sentence-transformers input stays one: the model goes where its Transformer module was and the other
    modules are copied (their names are returned). Write failures (disk full, permissions) become an OSError
    naming the output, which `main` prints as one line."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the result should look like any saved model
    relative = Path(model_folder).relative_to(source) if model_folder != str(source) else Path()
    try:
        try:
            model.save_pretrained(staging / relative)
            if tokenizer is not None:
                set_tokenizer_length(tokenizer, max_length)
                tokenizer.save_pretrained(staging / relative)
            kept = copy_sentence_modules(source, staging, max_length) if (source / MODULES_FILE).is_file() else []
        except (OSError, RuntimeError) as error:
            raise OSError(f"could not write {output}: {_first_line(error)}") from error
        except Exception as error:  # safetensors' SafetensorError (disk full while serialising) is no OSError
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(f"could not write {output}: {_first_line(error)}") from error
        if output.exists():
            if not overwrite and any(output.iterdir()):
                raise ValueError(f"the output folder {str(output)!r} appeared while converting; nothing was written")
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return kept


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


# --- run ------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    """Validate the options, then replace this process by the command (see lsg_patch.run)."""
    from .run import execute

    command = list(args.program)
    if command[:1] == ["--"]:
        command = command[1:]
    names = (*option_names(), *SEEDING_FLAGS)
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.max_length is not None:
        options["max_length"] = args.max_length
    execute(command, options)


# --- export -----------------------------------------------------------------------------------------------


def _add_export_command(commands: Any) -> None:
    export_parser = commands.add_parser(
        "export", help="write OUT/model.onnx (dynamic batch and length), the config and the tokenizer",
        description="Export an LSG checkpoint (or a plain one converted with --max-length) to ONNX for onnxruntime: "
        "OUT/model.onnx with dynamic batch and length, plus the config and tokenizer; a sentence-transformers folder "
        "also gets OUT/sentence_embedding.onnx (pooling and normalisation included).",
    )  # fmt: skip
    export_parser.add_argument("input", help="LSG checkpoint folder, or a plain one with --max-length")
    export_parser.add_argument("output", help="folder to write (must not exist unless --overwrite)")
    export_parser.add_argument("--max-length", type=int, default=None,
                               help="convert a plain checkpoint to this many tokens first (as convert does)")  # fmt: skip
    export_parser.add_argument("--lsg", metavar="JSON", default=None, help="LSG options as a JSON object")
    _add_lsg_flags(export_parser.add_argument_group("LSG options of the conversion (default: the saved ones)"))
    export_parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export_parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")


def export(args: argparse.Namespace) -> None:
    from .export import export_onnx

    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max-length {args.max_length} is not accepted: give a positive number of tokens")
    _check_output(Path(args.input), Path(args.output), args.overwrite)
    out = export_onnx(args.input, args.output, max_length=args.max_length, opset=args.opset,
                      overwrite=args.overwrite, **conversion_options(args).lsg_given())
    print(f"{PROG}: done: {', '.join(sorted(p.name for p in out.iterdir()))} in {out}")


# --- info -------------------------------------------------------------------------------------------------


def info(args: argparse.Namespace) -> None:
    report = checkpoint_report(Path(args.path))
    if args.json:
        print(json.dumps(report, indent=None, sort_keys=True))
        return
    print(f"{args.path}: {report['model_type']} {', '.join(report['architectures']) or '(no architecture)'}")
    print(f"  position embeddings: {report['positions'] or 'unknown (model type not supported by lsg_patch)'}")
    if not report["is_lsg"]:
        print("  plain checkpoint (no LSG settings)" + (f", {report['max_length']} positions" if report["max_length"] else ""))
        return
    print(f"  LSG checkpoint, saved by {report['saved_by']}; max length {report['max_length']}")
    print(f"  settings: {', '.join(f'{k}={v}' for k, v in report['settings'].items())}")
    print(f"  global table: {report['global_table_rows']} rows" if report["global_table_rows"] else "  global table: MISSING")


if __name__ == "__main__":
    sys.exit(main())
