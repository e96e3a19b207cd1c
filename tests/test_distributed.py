"""Many processes: torchrun with 2 CPU ranks (gloo) trains a patched model with DistributedDataParallel,
FSDP and the transformers Trainer (tests/ddp_worker.py); the ranks must end with identical parameters."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_worker import patched_model

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = WORKER.parents[1]


@pytest.fixture(scope="module")
def worker_output(tmp_path_factory) -> Path:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None, "torchrun ships with torch; its absence means a broken environment"
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide
    command = [torchrun, "--standalone", "--nproc_per_node=2", str(WORKER), str(out)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in 240 s:\n{(error.stderr or b'')[-4000:]}")
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return out


def load(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{name}.pt")


def assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("phase", ["ddp", "fsdp", "trainer"])
def test_ranks_end_with_identical_parameters(worker_output, phase):
    rank0, rank1 = load(worker_output, f"{phase}-rank0"), load(worker_output, f"{phase}-rank1")
    assert_same(rank0, rank1)
    initial = dict(patched_model().named_parameters())
    assert rank0.keys() == initial.keys()
    assert "bert.embeddings.global_embeddings.weight" in rank0
    trained = [name for name in rank0 if not torch.equal(rank0[name], initial[name])]
    assert len(trained) == len(rank0), sorted(set(rank0) - set(trained))  # every parameter took gradients


def test_fsdp_trains_like_ddp(worker_output):
    assert_same(load(worker_output, "ddp-rank0"), load(worker_output, "fsdp-rank0"), atol=1e-6)


def test_trainer_checkpoint_reloads_under_lsg_patch(worker_output):
    reload = load(worker_output, "trainer-reload")
    assert reload["is_lsg"]
    torch.testing.assert_close(reload["after"], reload["before"], rtol=0, atol=1e-6)
