#!/usr/bin/env python
"""GPU evidence in one command: lsg_patch's correctness on a device, then LSG attention's time and memory there.

    python benchmarks/gpu_check.py                           # CUDA when present: full run
    python benchmarks/gpu_check.py --device cpu --quick      # CPU smoke run (tests/test_gpu_check.py)

1. Correctness on the device, one PASS/FAIL line per check as it runs (exit code 1 if any fails):
   * every golden case (tests/golden) with model and inputs on the device: float32 against the recorded outputs
     at atol 1e-5 (as tests/test_golden.py), bf16 and fp16 (`model.to(dtype)`) against the same float32 outputs;
   * the attention product against the dense float64 CPU oracle (tests/oracle.py) for every sparsity type,
     causal and not, on a padded batch, in every dtype; and its float32 gradients against float64 autograd
     through the oracle;
   * the backend `backend_for` picks for the device ("portable" everywhere but the CPU);
   * causal generation with the LSGCache: the logits of 20 tokens fed one by one after a cached prompt against
     the uncached forward over the whole sequence, for three sparsity types, float32;
   * attention dropout: with the same seed, the product and its gradients on the device equal those on the CPU
     (the keep-mask is a function of the seed and of (row, head, query, key), not of the device or the blocking).
2. Time (median of 5 runs after 2 warm-ups) and peak memory (CUDA) of `lsg_attention` (auto backend) against
   dense `scaled_dot_product_attention` on the same tensors, forward and forward+backward; the time per generated
   token after a long prompt, LSGCache against transformers' dense cache (SDPA); without --quick also a BERT-base
   model converted with `to_lsg` against the same shape with sdpa, forward only.
3. Grouped-query attention: `lsg_attention` with 32 query heads sharing 8 key heads, against keys repeated first.
4. Fused kernels (issue 20): LSG attention through the triton backend and the portable backend against dense
   SDPA with the flash kernel, at 4096 / 16384 / 32768 tokens (--quick: 256 / 512), forward and forward+backward,
   attention dropout 0 and 0.1: time, peak memory and the GPU operations (kernels, copies, fills) one step runs,
   counted with torch.profiler; the issue's targets are checked against the measured ratios. The triton rows
   run on CUDA only.
5. Model steps (issue 13 on the device): forward and training step of whole models, lsg_patch with and without
   attention dropout against full SDPA and the sparse peers of benchmarks/run.py, in fp32 and under fp16 / bf16
   autocast, at the default shape (4096 and 16384 tokens) and BERT-base size (4096).
6. A markdown report (--out: date, device, versions, command, the tables), also printed at the end.

fp16 is left out on the CPU. A CPU run without --quick uses the GPU sizes (up to 32768 tokens): it takes long.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # lsg_patch from this checkout, whether or not it is pip-installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lsg_patch  # noqa: E402
from lsg_patch.attention import AttentionLayout, lsg_attention, prepare_mask  # noqa: E402
from lsg_patch.attention.backends import BACKEND_VARIABLE, backend_for, requested_backend  # noqa: E402

SPARSITY_TYPES = ("none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh")
GOLDEN_ATOL = 1e-5  # tests/test_golden.py
PRODUCT_ATOL = 1e-4  # float32 against float64: observed <= 2e-6 on the CPU
CACHE_ATOL = 1e-4  # float32 cached steps against the uncached forward: observed <= 5e-6 on the CPU
CACHE_TYPES = ("pooling", "lsh", "bos_pooling")  # norm can flip between keys of equal norm in float32
DROPOUT_TYPES = ("norm", "pooling", "lsh")
DROPOUT_ATOL = 1e-4  # float32 on the device against float32 on the CPU, same seed: observed 0 on the CPU
# model steps: (shape, systems, lengths); every system in fp32, fp16 autocast (CUDA) and bf16 autocast
MODEL_STEPS = (
    ("default", ("lsg-128-128-norm", "lsg-128-128-norm-nodrop", "sdpa", "sdpa-nodrop", "longformer-256", "bigbird",
                 "longt5-local", "longt5-tglobal", "t5-lsg-128-128-norm"), (4096, 16384)),
    ("base", ("lsg-128-128-norm", "lsg-128-128-norm-nodrop", "sdpa", "sdpa-nodrop"), (4096,)),
)
GROUPED_HEADS = (32, 8, 64)  # query heads, key heads, head size (Llama-3-8B's grouping)
QUICK_MODEL_STEPS = (("toy", ("lsg-128-128-norm", "lsg-128-128-norm-nodrop", "sdpa"), (512,)),)
SELECTION_RTOL = 1e-1  # low-precision golden cases that pick keys by norm (see `golden_tolerance`)
WARMUP, RUNS = 2, 5
MODES = ("forward", "train")
# the attention product's test input: batch 2 (row 1 padded), 3 heads of 16, 2 globals, 6 blocks of 8 tokens
PRODUCT_BATCH, PRODUCT_HEADS, PRODUCT_HEAD_DIM, PRODUCT_TOKENS, PRODUCT_SECOND_ROW = 2, 3, 16, 48, 37
OUTPUT_FIELDS = {"decoder_last_hidden_state": "last_hidden_state"}  # recorded name -> model output field


def load_repo_module(relative: str, name: str) -> ModuleType:
    """A module of this checkout by path: tests/ and benchmarks/ are namespace packages, which a regular package
    of the same name in site-packages would shadow."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


oracle = load_repo_module("tests/oracle.py", "oracle")
golden = load_repo_module("tests/golden_cases.py", "golden_cases")
bench = load_repo_module("benchmarks/run.py", "bench_run")


# --------------------------------------------------------------------------------------------------------------
# Correctness


@dataclass
class Check:
    """One correctness check as the report shows it."""

    name: str
    dtype: str
    error: str
    tolerance: str
    passed: bool
    note: str = ""

    def line(self) -> str:
        note = f"  ({self.note})" if self.note else ""
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict}  {self.name} [{self.dtype}] {self.error}, tolerance {self.tolerance}{note}"


def add(checks: list[Check], check: Check) -> None:
    """Keep a check and print its line at once, so a hang or crash on the device still shows how far it got."""
    checks.append(check)
    print(check.line(), flush=True)


def record(checks: list[Check], name: str, dtype: torch.dtype, compute: Callable[[], tuple[str, float, float]]
           ) -> None:
    """Run one numeric check (compute returns metric, error, tolerance). An exception fails that check only, so
    one device error does not hide the others."""
    try:
        metric, error, tolerance = compute()
        check = Check(name, dtype_name(dtype), f"{metric} {error:.2e}", f"{tolerance:.2g}",
                      math.isfinite(error) and error <= tolerance)
    except Exception as exc:  # noqa: BLE001 - reported as this check's FAIL
        message = (str(exc).strip().splitlines() or [""])[0][:200]
        check = Check(name, dtype_name(dtype), "error", "-", False, f"{type(exc).__name__}: {message}")
    add(checks, check)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the report's spelling."""
    return str(dtype).removeprefix("torch.")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius norm of the difference over that of the reference (float64; NaN stays NaN)."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, in float64 (NaN stays NaN); a shape mismatch is an error, not a broadcast."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    return (actual.double() - expected.double()).abs().max().item()


def low_precision_tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed to a bf16/fp16 result against a float32/float64 reference: 4 machine epsilons
    (bf16 3.1e-2, fp16 3.9e-3). Rounding at every op puts these results at 0.6 to 1.5 eps on the CPU."""
    return 4 * torch.finfo(dtype).eps


def backend_checks(device: torch.device, checks: list[Check]) -> None:
    """The backend backend_for picks: "portable" on every device but the CPU (the triton backend is opt-in,
    LSG_PATCH_BACKEND=triton, until this script has measured it); on those, forcing the CPU-only "cpu_fused" must be
    refused too, so that no CPU-only op is reachable there."""
    setting = f"{BACKEND_VARIABLE}={os.environ.get(BACKEND_VARIABLE, '(unset)')}"
    try:
        chosen, requested = backend_for(device), requested_backend()
    except ValueError as exc:
        add(checks, Check("backend", "-", "error", "-", False, f"{setting}: {exc}"))
        return
    auto = "cpu_fused" if device.type == "cpu" else "portable"
    expected = auto if requested == "auto" else requested
    add(checks, Check("backend", "-", chosen, expected, chosen == expected, setting))
    if device.type == "cpu":
        return
    previous = os.environ.get(BACKEND_VARIABLE)
    os.environ[BACKEND_VARIABLE] = "cpu_fused"
    try:
        backend_for(device)
        refused = False
    except ValueError:
        refused = True
    finally:
        if previous is None:
            del os.environ[BACKEND_VARIABLE]
        else:
            os.environ[BACKEND_VARIABLE] = previous
    add(checks, Check("backend cpu_fused forced", "-", "refused" if refused else "accepted", "refused", refused))


def golden_checks(device: torch.device, dtypes: list[torch.dtype], checks: list[Check]) -> None:
    """Every golden case in every dtype, model and inputs on the device (one model per case and dtype)."""
    for name in golden.case_names():
        case = golden.load_case(name)
        for dtype in dtypes:
            record(checks, f"golden {name}", dtype, lambda: golden_error(case, device, dtype))


def golden_error(case: Any, device: torch.device, dtype: torch.dtype) -> tuple[str, float, float]:
    """The worst error over the case's recorded outputs: max abs in float32, relative in bf16/fp16."""
    model = golden_model(case).to(device=device, dtype=dtype)
    inputs = {key: value.to(device) for key, value in case.prefixed("inputs.").items()}
    with torch.no_grad():
        out = model(**inputs)
    expected = case.prefixed("outputs.")
    actual = {key: getattr(out, OUTPUT_FIELDS.get(key, key)).float().cpu() for key in expected}
    if dtype == torch.float32:
        return "max abs", max(max_abs_error(actual[k], v) for k, v in expected.items()), GOLDEN_ATOL
    return "rel", max(relative_error(actual[k], v) for k, v in expected.items()), golden_tolerance(case, dtype)


def golden_model(case: Any) -> torch.nn.Module:
    """The case's LSG model, built on the CPU as tests/test_golden*.py build it (convert_bert: converted)."""
    if case.model_type == "bart":
        return golden.lsg_seq2seq_model_for(case)
    if "conversion" not in case.meta:
        return golden.lsg_model_for(case)
    conversion = case.meta["conversion"]
    model = golden.plain_model(case, conversion["source_config"])
    model.load_state_dict(load_file(str(golden.GOLDEN / case.meta["files"]["source"])), strict=True)
    lsg_patch.to_lsg(model, max_length=conversion["max_sequence_length"], bos_token_id=conversion["bos_id"],
                     mask_token_id=conversion["mask_id"],
                     global_positional_stride=conversion["global_positional_stride"], **case.lsg_params)
    return model


def golden_tolerance(case: Any, dtype: torch.dtype) -> float:
    """Relative tolerance of a bf16/fp16 golden output against the recorded float32 one.

    Cases that pick sparse keys by norm get SELECTION_RTOL: their recorded norm margins go down to 2e-4
    (norm_min_selection_gap), below bf16/fp16 resolution, so low precision legitimately picks other keys in a
    few chunks of these peaked (init std 0.2) models; on the CPU that gives up to 5e-2, moving by 2x when the
    weights move by 1e-3. A device bug (wrong keys, masks or dtype) gives O(1) or NaN. Others: 4 eps.
    """
    params = case.lsg_params
    tokens = case.tensors["inputs.input_ids"].shape[1]
    selects = (params["sparsity_type"] in ("norm", "lsh") and params["sparse_block_size"] > 0
               and params["sparsity_factor"] > 1 and tokens > 2 * params["block_size"])
    return SELECTION_RTOL if selects else low_precision_tolerance(dtype)


def product_case(kind: str) -> tuple[AttentionLayout, tuple[torch.Tensor, ...], torch.Tensor]:
    """Layout, float64 CPU (query, key, value) and token mask of the product checks for one sparsity type.

    For norm, token keys get distinct norms 1.5% to 5% apart: norm picks the largest keys of each chunk, and
    with that margin rounding to bf16/fp16 (0.4% / 0.05%) cannot change the pick, so every dtype attends to
    the keys the oracle attends to.
    """
    layout = AttentionLayout(num_global_tokens=2, block_size=8, sparse_block_size=8, sparsity_factor=2,
                             sparsity_type=kind)
    g, t = layout.num_global_tokens, PRODUCT_TOKENS
    generator = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(3, PRODUCT_BATCH, PRODUCT_HEADS, g + t, PRODUCT_HEAD_DIM,
                                    generator=generator, dtype=torch.float64)
    if kind == "norm":
        levels = 1 + 0.05 * torch.randperm(t, generator=generator).double()
        tokens = key[:, :, g:]
        key[:, :, g:] = tokens / tokens.norm(dim=-1, keepdim=True) * levels[:, None]
    token_mask = torch.arange(t) < torch.tensor([[t], [PRODUCT_SECOND_ROW]])
    return layout, (query, key, value), token_mask


def product_checks(device: torch.device, dtypes: list[torch.dtype], checks: list[Check]) -> None:
    """Forward in every dtype and float32 gradients, for every sparsity type, causal and not."""
    for kind in SPARSITY_TYPES:
        for causal in (False, True):
            suffix = " causal" if causal else ""
            for dtype in dtypes:
                record(checks, f"product {kind}{suffix}", dtype, lambda: product_error(kind, causal, device, dtype))
            record(checks, f"gradient {kind}{suffix}", torch.float32, lambda: gradient_error(kind, causal, device))


def product_error(kind: str, causal: bool, device: torch.device, dtype: torch.dtype) -> tuple[str, float, float]:
    """lsg_attention on the device against the float64 oracle on the CPU (on the unrounded inputs)."""
    layout, qkv, token_mask = product_case(kind)
    expected = oracle.oracle_attention(*qkv, token_mask, layout, causal=causal)
    mask = prepare_mask(token_mask.to(device), layout)
    out = lsg_attention(*(x.to(device=device, dtype=dtype) for x in qkv), mask, layout, causal=causal)
    if dtype == torch.float32:
        return "max abs", max_abs_error(out.cpu(), expected), PRODUCT_ATOL
    return "rel", relative_error(out.cpu(), expected), low_precision_tolerance(dtype)


def gradient_error(kind: str, causal: bool, device: torch.device) -> tuple[str, float, float]:
    """Query, key and value gradients of the float32 product on the device against float64 autograd through
    the oracle on the CPU, for one random output gradient; the worst of the three."""
    layout, qkv, token_mask = product_case(kind)
    grad_out = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in qkv]
    expected = torch.autograd.grad(oracle.oracle_attention(*leaves, token_mask, layout, causal=causal), leaves,
                                   grad_out)
    inputs = [x.to(device=device, dtype=torch.float32).requires_grad_() for x in qkv]
    out = lsg_attention(*inputs, prepare_mask(token_mask.to(device), layout), layout, causal=causal)
    actual = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=torch.float32))
    return "max abs", max(max_abs_error(a.cpu(), e) for a, e in zip(actual, expected)), PRODUCT_ATOL


# --------------------------------------------------------------------------------------------------------------
# Time and memory


@dataclass
class Measurement:
    """Median milliseconds and peak MiB (CUDA only) of one step, or why there are none ("OOM", an error)."""

    ms: float | None = None
    peak_mib: float | None = None
    status: str = "ok"


@dataclass
class Timing:
    """One row of the timing table: LSG and dense on the same input."""

    what: str
    tokens: int
    dtype: str
    mode: str
    lsg: Measurement
    dense: Measurement

    def line(self) -> str:
        return (f"TIME  {self.what} {self.tokens} tokens [{self.dtype}] {self.mode}: "
                f"lsg {show_ms(self.lsg)} ms, dense {show_ms(self.dense)} ms")


def measure(step: Callable[[], object], device: torch.device) -> Measurement:
    """Median wall time of RUNS steps after WARMUP, synchronised on CUDA; there also the peak memory the timed
    steps allocate above what was allocated before them (inputs, model): activations, saved tensors,
    gradients, workspaces. Out of memory is a result ("OOM"), as is any other error, not the end of the run."""
    cuda = device.type == "cuda"
    try:
        for _ in range(WARMUP):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
        return Measurement(statistics.median(times) * 1e3, peak)
    except torch.cuda.OutOfMemoryError:
        return Measurement(status="OOM")
    except Exception as exc:  # noqa: BLE001 - shown in the table and failing the run
        return Measurement(status=f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}")


def release(device: torch.device) -> None:
    """Hand freed memory back between measurements, so one row's cache does not count against the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attention_step(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], mode: str
                   ) -> Callable[[], object]:
    """forward: no_grad. train: forward and backward to the inputs (autograd.grad: the gradients are freed)."""
    if mode == "forward":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(*inputs)
        return forward
    leaves = [x.detach().requires_grad_() for x in inputs]
    return lambda: torch.autograd.grad(fn(*leaves).sum(), leaves)


def attention_rows(device: torch.device, tokens: int, dtype: torch.dtype, heads: int, head_dim: int
                   ) -> list[Timing]:
    """LSG (the project's default layout, auto backend) and dense SDPA on the same (1, heads, 1 + T, d) tensors."""
    layout = AttentionLayout()  # block 128, sparse block 128, sparsity factor 2, norm, 1 global token
    inputs = tuple(torch.randn(1, heads, layout.num_global_tokens + tokens, head_dim, device=device, dtype=dtype)
                   for _ in range(3))
    mask = prepare_mask(torch.ones(1, tokens, dtype=torch.bool, device=device), layout)

    def lsg(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return lsg_attention(query, key, value, mask, layout)

    rows = []
    for mode in MODES:
        lsg_time = measure(attention_step(lsg, inputs, mode), device)
        release(device)
        dense_time = measure(attention_step(F.scaled_dot_product_attention, inputs, mode), device)
        release(device)
        rows.append(Timing("attention", tokens, dtype_name(dtype), mode, lsg_time, dense_time))
        print(rows[-1].line(), flush=True)
    return rows


def model_rows(device: torch.device, dtype: torch.dtype, lengths: tuple[int, ...]) -> list[Timing]:
    """BERT-base (random weights) converted with to_lsg (512 positions extended to the longest length) against
    the same shape with sdpa and a position table that long; forward only, built as benchmarks/run.py does."""
    shape, max_length = bench.SHAPES["base"], max(lengths)
    models = {key: bench.build_model(bench.SYSTEMS[key], shape, max_length).to(device=device, dtype=dtype).eval()
              for key in (bench.DEFAULT_LSG, "sdpa")}
    rows = []
    for length in lengths:
        times = {}
        for key, model in models.items():
            inputs = {k: v.to(device) for k, v in bench.make_inputs(bench.SYSTEMS[key], length).items()}
            times[key] = measure(lambda: bench.forward_step(model, inputs), device)
            release(device)
        rows.append(Timing("BERT-base model", length, dtype_name(dtype), "forward", times[bench.DEFAULT_LSG],
                           times["sdpa"]))
        print(rows[-1].line(), flush=True)
    return rows


def timing_rows(device: torch.device, quick: bool) -> list[Timing]:
    """Attention rows (bf16 on CUDA, with float32 at 4096 for reference; float32 elsewhere) and, without
    --quick, the model rows."""
    main_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        heads, head_dim, configs = 2, 32, [(256, main_dtype), (512, main_dtype)]
    else:
        heads, head_dim = 12, 64
        configs = [(tokens, main_dtype) for tokens in (4096, 16384, 32768)]
        if main_dtype != torch.float32:
            configs.insert(1, (4096, torch.float32))
    torch.manual_seed(0)
    rows = [row for tokens, dtype in configs for row in attention_rows(device, tokens, dtype, heads, head_dim)]
    rows += generation_rows(device, 512 if quick else 16384)
    if not quick:
        rows += model_rows(device, main_dtype, (4096, 16384))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Fused kernels (issue 20)

KERNEL_SYSTEMS = ("LSG triton", "LSG portable", "dense flash")
KERNEL_DROPOUTS = (0.0, 0.1)
# issue 20's targets against dense flash (bf16, 12 heads of 64): speed-up of the forward and of forward+backward
KERNEL_TARGETS = {("forward", 4096): 1.5, ("forward", 16384): 6.0, ("forward", 32768): 12.0,
                  ("train", 4096): 1.3, ("train", 16384): 5.0, ("train", 32768): 10.0}
MAX_FORWARD_LAUNCHES, MAX_PEAK_RATIO, MAX_DROPOUT_COST = 12, 1.5, 1.2


@dataclass
class KernelRow:
    """One row of the fused-kernel table: one system at one length, mode and dropout."""

    tokens: int
    dtype: str
    mode: str
    dropout: float
    system: str
    measured: Measurement
    launches: str

    def line(self) -> str:
        return (f"KERNEL {self.system} {self.tokens} tokens [{self.dtype}] {self.mode} dropout {self.dropout:g}: "
                f"{show_ms(self.measured)} ms, {show_mib(self.measured)} MiB, {self.launches} GPU ops")


@contextlib.contextmanager
def forced_backend(name: str | None) -> Any:
    """LSG_PATCH_BACKEND=name for the duration (None: leave it as it is)."""
    previous = os.environ.get(BACKEND_VARIABLE)
    if name is not None:
        os.environ[BACKEND_VARIABLE] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_VARIABLE, None)
        else:
            os.environ[BACKEND_VARIABLE] = previous


def count_gpu_ops(step: Callable[[], object], device: torch.device) -> str:
    """The GPU operations (kernels, copies, fills) one step puts on the device, counted by torch.profiler after
    one unprofiled step (compilation and autotuning happen there); "n/a" off CUDA."""
    if device.type != "cuda":
        return "n/a"
    try:
        step()
        torch.cuda.synchronize(device)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            step()
            torch.cuda.synchronize(device)
        return str(sum(event.device_type == torch.autograd.DeviceType.CUDA for event in profile.events()))
    except Exception as exc:  # noqa: BLE001 - shown in the table
        return f"error: {type(exc).__name__}"


def kernel_system(system: str, layout: AttentionLayout, mask: Any, dropout: float, device: torch.device
                  ) -> tuple[Callable[..., torch.Tensor], str | None]:
    """The attention function of one system and the backend it forces (None: none)."""
    if system == "dense flash":
        def dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION
            context = torch.nn.attention.sdpa_kernel(flash) if device.type == "cuda" else contextlib.nullcontext()
            with context:
                return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        return dense, None

    def lsg(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return lsg_attention(query, key, value, mask, layout, dropout_p=dropout)
    return lsg, system.removeprefix("LSG ")


def kernel_rows(device: torch.device, quick: bool) -> list[KernelRow]:
    """Issue 20's rows: every system of KERNEL_SYSTEMS on the same (1, heads, 1 + T, d) tensors (bf16 on CUDA,
    float32 elsewhere), default layout, every mode and dropout."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, head_dim, lengths = (2, 32, (256, 512)) if quick else (12, 64, (4096, 16384, 32768))
    layout = AttentionLayout()
    rows = []
    for tokens in lengths:
        torch.manual_seed(0)
        inputs = tuple(torch.randn(1, heads, layout.num_global_tokens + tokens, head_dim, device=device,
                                   dtype=dtype) for _ in range(3))
        mask = prepare_mask(torch.ones(1, tokens, dtype=torch.bool, device=device), layout)
        for mode in MODES:
            for dropout in KERNEL_DROPOUTS:
                for system in KERNEL_SYSTEMS:
                    if system == "LSG triton" and device.type != "cuda":
                        measured, launches = Measurement(status="CUDA only"), "-"
                    else:
                        fn, backend = kernel_system(system, layout, mask, dropout, device)
                        with forced_backend(backend):
                            step = attention_step(fn, inputs, mode)
                            measured = measure(step, device)
                            launches = count_gpu_ops(step, device) if measured.status == "ok" else "-"
                        release(device)
                    rows.append(KernelRow(tokens, dtype_name(dtype), mode, dropout, system, measured, launches))
                    print(rows[-1].line(), flush=True)
    return rows


def kernel_summary(rows: list[KernelRow]) -> list[str]:
    """Issue 20's targets, each against the ratio measured here (only where both sides were measured)."""
    found = {(r.system, r.tokens, r.mode, r.dropout): r for r in rows if r.measured.status == "ok"}
    lines = []
    for (mode, tokens), target in KERNEL_TARGETS.items():
        lsg, dense = found.get(("LSG triton", tokens, mode, 0.0)), found.get(("dense flash", tokens, mode, 0.0))
        if not (lsg and dense):
            continue
        speed = dense.measured.ms / lsg.measured.ms
        parts = [f"dense flash / LSG triton time {speed:.2f}x (target >= {target:g}x: "
                 f"{'met' if speed >= target else 'not met'})"]
        if lsg.measured.peak_mib is not None and dense.measured.peak_mib:
            memory = lsg.measured.peak_mib / dense.measured.peak_mib
            parts.append(f"peak memory {memory:.2f}x dense flash's (target <= {MAX_PEAK_RATIO:g}x: "
                         f"{'met' if memory <= MAX_PEAK_RATIO else 'not met'})")
        dropped = found.get(("LSG triton", tokens, mode, 0.1))
        if dropped:
            cost = dropped.measured.ms / lsg.measured.ms
            parts.append(f"dropout 0.1 costs {cost:.2f}x (target <= {MAX_DROPOUT_COST:g}x: "
                         f"{'met' if cost <= MAX_DROPOUT_COST else 'not met'})")
        if mode == "forward" and lsg.launches.isdigit():
            parts.append(f"{lsg.launches} GPU ops (target <= {MAX_FORWARD_LAUNCHES}: "
                         f"{'met' if int(lsg.launches) <= MAX_FORWARD_LAUNCHES else 'not met'})")
        lines.append(f"- {tokens} tokens, {mode}: " + "; ".join(parts))
    return lines or ["- no target checked: the triton rows run on CUDA only"]


@dataclass
class GroupedRow:
    """One row of the grouped-query table: shared key heads against keys repeated to the query heads first."""

    tokens: int
    dtype: str
    mode: str
    shared: Measurement
    repeated: Measurement

    def line(self) -> str:
        return (f"GQA   {self.tokens} tokens [{self.dtype}] {self.mode}: shared {show_ms(self.shared)} ms, "
                f"repeated {show_ms(self.repeated)} ms")


def grouped_rows(device: torch.device, quick: bool) -> list[GroupedRow]:
    """`lsg_attention` (default layout) on GROUPED_HEADS query heads sharing their key heads, against the same
    call on keys repeated to the query heads first (what the seam did before it could share them); forward,
    training, and training with attention dropout 0.1 (where the blocked kernel runs on every device)."""
    heads, key_heads, head_dim = (4, 2, 32) if quick else GROUPED_HEADS
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout = AttentionLayout()
    rows = []
    for tokens in (512,) if quick else (4096, 16384):
        length = layout.num_global_tokens + tokens
        query = torch.randn(1, heads, length, head_dim, device=device, dtype=dtype)
        key, value = (torch.randn(1, key_heads, length, head_dim, device=device, dtype=dtype) for _ in range(2))
        mask = prepare_mask(torch.ones(1, tokens, dtype=torch.bool, device=device), layout)
        for mode, dropout in (("forward", 0.0), ("train", 0.0), ("train, dropout 0.1", 0.1)):
            def shared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float = dropout) -> torch.Tensor:
                return lsg_attention(q, k, v, mask, layout, dropout_p=p)

            def repeated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float = dropout) -> torch.Tensor:
                k, v = (x.repeat_interleave(heads // key_heads, dim=1) for x in (k, v))
                return lsg_attention(q, k, v, mask, layout, dropout_p=p)

            measured = []
            for fn in (shared, repeated):
                measured.append(measure(attention_step(fn, (query, key, value), mode.split(",")[0]), device))
                release(device)
            rows.append(GroupedRow(tokens, dtype_name(dtype), mode, *measured))
            print(rows[-1].line(), flush=True)
    return rows


def decoder(device: torch.device, lsg: dict | None, hidden: int = 64, layers: int = 2) -> torch.nn.Module:
    """A Llama with random weights (2 key/value heads for 4 query heads), converted with `lsg` unless None."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                         max_position_embeddings=40000, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if lsg is not None:
        model = lsg_patch.to_lsg(model, max_length=36000, **lsg)
    return model.to(device)


def returned_cache(output: Any) -> Any:
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def cache_checks(device: torch.device, checks: list[Check]) -> None:
    for kind in CACHE_TYPES:
        record(checks, f"cached generation {kind}", torch.float32, lambda kind=kind: cache_error(kind, device))


def cache_error(kind: str, device: torch.device) -> tuple[str, float, float]:
    """Largest logit difference between a 45-token prompt and 19 cached steps after it and the uncached forward."""
    model = decoder(device, dict(block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type=kind,
                                 num_global_tokens=2))
    ids = torch.randint(5, 32000, (1, 65), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits[:, 44:64]
        output = model(ids[:, :45], use_cache=True)
        cache, got = returned_cache(output), [output.logits[:, -1:]]
        for j in range(45, 64):
            got.append(model(ids[:, j : j + 1], past_key_values=cache).logits)
    return "max abs", max_abs_error(torch.cat(got, dim=1), expected), CACHE_ATOL


def dropout_checks(device: torch.device, checks: list[Check]) -> None:
    for kind in DROPOUT_TYPES:
        for causal in (False, True):
            suffix = " causal" if causal else ""
            record(checks, f"dropout {kind}{suffix} = CPU", torch.float32,
                   lambda kind=kind, causal=causal: dropout_error(kind, causal, device))


def dropout_error(kind: str, causal: bool, device: torch.device) -> tuple[str, float, float]:
    """Output and query/key/value gradients of the float32 product with dropout 0.1 on the device against the same
    call on the CPU after the same `torch.manual_seed` (the seed comes from the CPU generator): the worst of the
    four. A device-dependent or blocking-dependent keep-mask gives O(1) differences."""
    layout, qkv, token_mask = product_case(kind)
    grad_out = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(1))
    results = []
    for where in (torch.device("cpu"), device):
        inputs = [x.to(device=where, dtype=torch.float32).requires_grad_() for x in qkv]
        torch.manual_seed(7)
        out = lsg_attention(*inputs, prepare_mask(token_mask.to(where), layout), layout, causal=causal,
                            dropout_p=0.1)
        grads = torch.autograd.grad(out, inputs, grad_out.to(where))
        results.append([x.detach().cpu() for x in (out, *grads)])
    return "max abs", max(max_abs_error(a, e) for a, e in zip(results[1], results[0])), DROPOUT_ATOL


def generation_rows(device: torch.device, tokens: int) -> list[Timing]:
    """Time per generated token after a `tokens`-token prompt: LSG with its LSGCache (default layout, norm)
    against the unconverted model with SDPA and transformers' dense cache; hidden 256, 4 layers, float32."""
    ids = torch.randint(5, 32000, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    times = {}
    for name, lsg in (("lsg", {}), ("dense", None)):
        model = decoder(device, lsg, hidden=256, layers=4)
        with torch.no_grad():
            output = model(ids, use_cache=True)
        state = {"cache": returned_cache(output), "token": output.logits[:, -1:].argmax(-1)}

        def step(model: torch.nn.Module = model, state: dict = state) -> None:
            with torch.no_grad():
                output = model(state["token"], past_key_values=state["cache"], use_cache=True)
            state["cache"], state["token"] = returned_cache(output), output.logits[:, -1:].argmax(-1)

        times[name] = measure(step, device)
        del model, state
        release(device)
    row = Timing("generation, per token after the prompt", tokens, "float32", "decode", times["lsg"], times["dense"])
    print(row.line(), flush=True)
    return [row]


@dataclass
class ModelStep:
    """One row of the model-step table: a benchmarks/run.py system at one length and precision."""

    shape: str
    system: str
    tokens: int
    precision: str
    forward: Measurement
    train: Measurement

    def line(self) -> str:
        return (f"STEP  {self.shape} {self.system} {self.tokens} tokens [{self.precision}]: forward "
                f"{show_ms(self.forward)} ms, train {show_ms(self.train)} ms")


def precisions(device: torch.device) -> list[tuple[str, torch.dtype | None]]:
    """fp32, then autocast to fp16 (CUDA only: the CPU's fp16 matrix products are not a training setting) and bf16."""
    found: list[tuple[str, torch.dtype | None]] = [("fp32", None)]
    if device.type == "cuda":
        found.append(("fp16 autocast", torch.float16))
    return found + [("bf16 autocast", torch.bfloat16)]


def model_step(model: torch.nn.Module, inputs: dict, phase: str, dtype: torch.dtype | None, device: torch.device
               ) -> Callable[[], object]:
    """benchmarks/run.py's forward (eval, no_grad) or training step (train mode, dropout on), under autocast."""
    model.train(phase == "train")
    run = bench.train_step if phase == "train" else bench.forward_step

    def step() -> object:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return run(model, inputs)
    return step


def model_step_rows(device: torch.device, quick: bool) -> list[ModelStep]:
    """Forward and training step of every system of MODEL_STEPS (QUICK_MODEL_STEPS with --quick), built by
    benchmarks/run.py (same weights init, dropout and inputs), at every length and precision."""
    rows = []
    for shape, systems, lengths in QUICK_MODEL_STEPS if quick else MODEL_STEPS:
        for key in systems:
            system = bench.SYSTEMS[key]
            torch.manual_seed(0)
            model = bench.build_model(system, bench.SHAPES[shape], max(lengths)).to(device)
            for length in lengths:
                inputs = {k: v.to(device) for k, v in bench.make_inputs(system, length).items()}
                for name, dtype in precisions(device):
                    measured = {}
                    for phase in bench.PHASES:
                        measured[phase] = (measure(model_step(model, inputs, phase, dtype, device), device)
                                           if phase in system.phases else Measurement(status="-"))
                        release(device)
                    rows.append(ModelStep(shape, key, length, name, measured["forward"], measured["train"]))
                    print(rows[-1].line(), flush=True)
            del model
            release(device)
    return rows


def model_step_summary(rows: list[ModelStep]) -> list[str]:
    """Issue 13's comparisons on this device, from the table: dropout cost, autocast speed-up, the fastest peer."""
    train = {(r.shape, r.system, r.tokens, r.precision): r.train.ms for r in rows if r.train.status == "ok"}
    lines = []
    for (shape, system, tokens, precision), ms in train.items():
        if system != bench.DEFAULT_LSG:
            continue
        where = f"{shape} shape, {tokens} tokens, {precision}"
        nodrop = train.get((shape, "lsg-128-128-norm-nodrop", tokens, precision))
        fp32 = train.get((shape, system, tokens, "fp32"))
        peers = {k[1]: v for k, v in train.items() if k[0] == shape and k[2] == tokens and k[3] == precision
                 and not k[1].startswith("lsg") and not k[1].endswith("nodrop") and bench.SYSTEMS[k[1]].global_path}
        parts = []
        if nodrop:
            parts.append(f"dropout 0.1 / dropout 0: {ms / nodrop:.2f}x")
        if fp32 and precision != "fp32":
            parts.append(f"{fp32 / ms:.2f}x the fp32 speed")
        if peers:
            fastest = min(peers, key=peers.get)
            parts.append(f"fastest peer with its dropout: {bench.SYSTEMS[fastest].label} {peers[fastest]:.1f} ms "
                         f"({peers[fastest] / ms:.2f}x lsg_patch's time)")
        lines.append(f"- {where}: lsg_patch trains in {ms:.1f} ms; " + "; ".join(parts))
    return lines


# --------------------------------------------------------------------------------------------------------------
# Report


def show_ms(m: Measurement) -> str:
    """The table's time cell: milliseconds, or why there are none."""
    return f"{m.ms:.2f}" if m.status == "ok" else m.status


def show_mib(m: Measurement) -> str:
    """The table's memory cell: MiB, n/a off CUDA, OOM, or "-" after an error (the time cell says which)."""
    if m.status != "ok":
        return "OOM" if m.status == "OOM" else "-"
    return "n/a" if m.peak_mib is None else f"{m.peak_mib:.0f}"


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and how many threads torch uses."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device}, CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return f"CPU: {name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def checkout() -> str:
    """The git commit of this checkout (+ "dirty" when the working tree differs), or "unknown" without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}{' (dirty)' if dirty else ''}"


def render(device: torch.device, dtypes: list[torch.dtype], quick: bool, checks: list[Check],
           timings: list[Timing], kernels: list[KernelRow], grouped: list[GroupedRow], steps: list[ModelStep],
           seconds: float) -> str:
    """The markdown report: header (date, device, versions, command), correctness table, timing table."""
    failed = sum(not c.passed for c in checks) + sum(m.status.startswith("error") for t in timings
                                                     for m in (t.lsg, t.dense)) + sum(
        r.measured.status.startswith("error") for r in kernels)
    lines = [
        f"# GPU check: lsg_patch on {device_description(device)}", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, lsg_patch {getattr(lsg_patch, '__version__', '?')}, checkout {checkout()}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- took {seconds:.0f} s; result: " + (f"FAIL ({failed} failed)" if failed else
                                               f"all {len(checks)} checks PASS"),
        "", "## Correctness on the device", "",
        f"dtypes: {', '.join(dtype_name(d) for d in dtypes)}"
        + ("" if torch.float16 in dtypes else " (fp16 is not run on the CPU)") + ". "
        f"golden: the tests/golden cases, model and inputs on the device, against the recorded float32 outputs "
        f"(float32: max abs <= {GOLDEN_ATOL:g}; bf16/fp16: relative Frobenius error <= 4 eps of the dtype, or "
        f"<= {SELECTION_RTOL:g} for cases that pick keys by norm, whose recorded norm margins are below bf16/fp16 "
        f"resolution). product: `lsg_attention` on the device against the float64 CPU oracle (tests/oracle.py), "
        f"batch {PRODUCT_BATCH} with row 1 padded to {PRODUCT_SECOND_ROW} of {PRODUCT_TOKENS} tokens, "
        f"{PRODUCT_HEADS} heads of {PRODUCT_HEAD_DIM}, 2 globals, block 8, sparse block 8, factor 2 "
        f"(float32: max abs <= {PRODUCT_ATOL:g}; bf16/fp16: relative <= 4 eps, bf16 "
        f"{low_precision_tolerance(torch.bfloat16):.2g}, fp16 {low_precision_tolerance(torch.float16):.2g}). "
        f"gradient: float32 query/key/value gradients on the device against float64 autograd through the oracle "
        f"(max abs <= {PRODUCT_ATOL:g}).", "",
        "| check | dtype | error | tolerance | result |", "|---|---|---|---|---|",
    ]
    lines += [f"| {c.name} | {c.dtype} | {c.error} | {c.tolerance} | {'PASS' if c.passed else 'FAIL'}"
              f"{' (' + c.note + ')' if c.note else ''} |" for c in checks]
    memory = ("peak MiB: `torch.cuda.max_memory_allocated` during the timed runs minus what was allocated before "
              "them (inputs, model)" if device.type == "cuda" else "peak memory: n/a (not measured off CUDA)")
    lines += [
        "", "## Time and memory", "",
        f"Median of {RUNS} runs after {WARMUP} warm-ups, batch 1. attention: `lsg_attention` (layout block 128, "
        f"sparse block 128, factor 2, norm, 1 global; default backend) against dense "
        f"`scaled_dot_product_attention` on the same (1, heads, 1 + T, d) tensors "
        f"({'2 heads of 32' if quick else '12 heads of 64'}); forward under no_grad, train = forward + backward "
        f"to q, k, v. "
        + ("" if quick else "BERT-base model: 12 layers, hidden 768, `to_lsg(max_length=16384)` against sdpa, "
           "forward. ") + f"{memory}.", "",
        "| what | tokens | dtype | mode | LSG ms | dense ms | dense/LSG | LSG peak MiB | dense peak MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in timings:
        ratio = f"{t.dense.ms / t.lsg.ms:.2f}" if t.lsg.status == t.dense.status == "ok" else "-"
        lines.append(f"| {t.what} | {t.tokens} | {t.dtype} | {t.mode} | {show_ms(t.lsg)} | {show_ms(t.dense)} | "
                     f"{ratio} | {show_mib(t.lsg)} | {show_mib(t.dense)} |")
    lines += [
        "", "## Fused kernels (issue 20)", "",
        f"`lsg_attention` (default layout) through LSG_PATCH_BACKEND=triton and =portable against dense "
        f"`scaled_dot_product_attention` with the flash kernel (`sdpa_kernel(FLASH_ATTENTION)` on CUDA), same "
        f"(1, heads, 1 + T, d) tensors ({'2 heads of 32' if quick else '12 heads of 64'}), attention dropout 0 and "
        f"0.1; forward under no_grad, train = forward + backward to q, k, v. GPU ops: kernels, copies and fills "
        f"one step runs (torch.profiler, after a warm step). {memory}.", "",
        *kernel_summary(kernels), "",
        "| tokens | dtype | mode | dropout | system | ms | peak MiB | GPU ops |",
        "|---:|---|---|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {r.tokens} | {r.dtype} | {r.mode} | {r.dropout:g} | {r.system} | {show_ms(r.measured)} | "
              f"{show_mib(r.measured)} | {r.launches} |" for r in kernels]
    heads, key_heads, head_dim = GROUPED_HEADS
    lines += [
        "", "## Grouped-query attention: shared key heads against repeated keys", "",
        f"`lsg_attention` (default layout) with {'4 query heads sharing 2 key heads of 32' if quick else f'{heads} query heads sharing {key_heads} key heads of {head_dim}'}: "
        "shared = the keys as they are, repeated = `repeat_interleave` to the query heads first, then the same "
        f"call (which shares them only where that is the faster choice: see `product._shares_key_heads`); forward "
        f"under no_grad, train = forward + backward to q, k, v. {memory}.", "",
        "| tokens | dtype | mode | shared ms | repeated ms | repeated/shared | shared peak MiB | repeated peak MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in grouped:
        ratio = f"{r.repeated.ms / r.shared.ms:.2f}" if r.shared.status == r.repeated.status == "ok" else "-"
        lines.append(f"| {r.tokens} | {r.dtype} | {r.mode} | {show_ms(r.shared)} | {show_ms(r.repeated)} | {ratio} | "
                     f"{show_mib(r.shared)} | {show_mib(r.repeated)} |")
    lines += [
        "", "## Model steps", "",
        f"Whole models built by benchmarks/run.py (random weights; BERT-family systems keep BERT's dropout 0.1, "
        f"attention included, unless named 'dropout 0'; T5 and LongT5 their 0.1), batch 1, median of {RUNS} runs "
        f"after {WARMUP} warm-ups. forward: eval, no_grad; train: forward + backward of the mean square of the "
        f"last hidden state, dropout on. Autocast rows run the same fp32 weights under `torch.autocast`. {memory}.",
        "", *model_step_summary(steps), "",
        "| shape | system | tokens | precision | forward ms | forward peak MiB | train ms | train peak MiB |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.shape} | {bench.SYSTEMS[r.system].label} | {r.tokens} | {r.precision} | {show_ms(r.forward)} | "
              f"{show_mib(r.forward)} | {show_ms(r.train)} | {show_mib(r.train)} |" for r in steps]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every check, then the timings; write and print the report; 1 if anything failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny timing rows (256 and 512 tokens), no model rows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    device = torch.device(args.device)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type != "cpu" else [])
    started = time.perf_counter()
    print(f"gpu_check on {device_description(device)}, dtypes {', '.join(map(dtype_name, dtypes))}", flush=True)
    checks: list[Check] = []
    backend_checks(device, checks)
    golden_checks(device, dtypes, checks)
    product_checks(device, dtypes, checks)
    cache_checks(device, checks)
    dropout_checks(device, checks)
    timings = timing_rows(device, args.quick)
    kernels = kernel_rows(device, args.quick)
    grouped = grouped_rows(device, args.quick)
    steps = model_step_rows(device, args.quick)
    report = render(device, dtypes, args.quick, checks, timings, kernels, grouped, steps,
                    time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print("\n" + report, flush=True)
    failures = [c.line() for c in checks if not c.passed] + [
        t.line() for t in timings if "error" in (t.lsg.status + t.dense.status)] + [
        r.line() for r in steps if r.system.startswith("lsg") and "error" in r.forward.status + r.train.status] + [
        r.line() for r in grouped if "error" in r.shared.status + r.repeated.status] + [
        r.line() for r in kernels if "error" in r.measured.status]
    if failures:
        print(f"FAIL: {len(failures)} failed (report: {args.out})\n" + "\n".join(failures), flush=True)
        return 1
    print(f"PASS: all {len(checks)} checks (report: {args.out})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
