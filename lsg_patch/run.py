"""`lsg-patch run -- COMMAND`: run a program whose Python processes all start with `lsg_patch.enabled()` active.

Scripts written for plain transformers (a Trainer script, a pipeline) then load LSG checkpoints as LSG models
and, given --max-length, convert plain ones, without an edit. How: the command gets a PYTHONPATH whose first
entry is `lsg_patch/_bootstrap`, holding a `sitecustomize.py` that Python's site module imports at start-up,
and the options as JSON in LSG_PATCH_RUN. This reaches every Python process of the command, also those it
starts itself (torchrun, accelerate launch, DataLoader workers, `python -m`), unlike running the script with
runpy in this process. It does not reach a Python started with -I or -S (no PYTHONPATH / no site module).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

ENV_OPTIONS = "LSG_PATCH_RUN"
ENV_HOME = "LSG_PATCH_HOME"
BOOTSTRAP = Path(__file__).resolve().parent / "_bootstrap"


def child_environment(options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus the bootstrap folder first on PYTHONPATH and the options; validates them first."""
    from .context import check_enabled_options

    check_enabled_options(**options)
    env = dict(environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(BOOTSTRAP)]
    env["PYTHONPATH"] = os.pathsep.join([str(BOOTSTRAP), *rest])
    env[ENV_OPTIONS] = json.dumps(dict(options))
    env[ENV_HOME] = str(BOOTSTRAP.parent.parent)
    return env


def execute(command: Sequence[str], options: Mapping[str, Any]) -> None:
    """Replace this process by `command` (signals and exit status are the command's own)."""
    if not command:
        raise ValueError("lsg-patch run needs a command after --, e.g. lsg-patch run -- python train.py")
    env = child_environment(options, os.environ)
    os.execvpe(command[0], list(command), env)


def activate(text: str) -> None:
    """Called by the bootstrap in each process: enabled() with the options, for the whole process."""
    from .context import enable_for_process

    enable_for_process(**json.loads(text))
