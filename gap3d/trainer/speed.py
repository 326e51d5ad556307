"""What the hardware offers the training step, detected rather than assumed.

* :func:`make_adamw`: AdamW with the fused multi-tensor kernel where this torch build has it
  (CPU included since torch 2.4), else the ``foreach`` implementation.
* :func:`cpu_matmul_rates` / :func:`cpu_bf16_speedup`: the measured fp32 and bf16 matmul rate
  of this CPU at the thread count in use. CPUs with AMX or AVX-512-BF16 run bf16 matmuls
  several times faster than fp32; others (AVX2 only) emulate bf16 and run it several times
  *slower*. The measurement is cached per (CPU, torch version, threads) in
  ``$GAP3D_CACHE/cpu_rates.json`` so a run pays for it once.
* :func:`resolve_precision`: ``train.precision=auto`` -> ``bf16-mixed`` on a GPU that supports
  it, ``bf16-mixed`` on a CPU whose bf16 matmuls are measured at least
  :data:`BF16_MIN_SPEEDUP` times faster *and* whose bf16 training step agrees with fp32
  (:func:`bf16_agrees`), else ``32-true``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# bf16 autocast adds casts around every matmul; below this matmul speed-up it does not pay.
BF16_MIN_SPEEDUP = 1.5
# bf16-vs-fp32 agreement required of one training step (loss, gradient direction).
BF16_MAX_LOSS_REL = 0.02
BF16_MIN_GRAD_COS = 0.99


def make_adamw(params: Any, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where supported (one kernel for all parameters), else ``foreach``."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _cache_dir() -> Path:
    return Path(os.environ.get("GAP3D_CACHE", Path.home() / ".cache" / "gap3d"))


def _cpu_key(threads: int) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                model += "|" + line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    blob = f"{model}|{torch.__version__}|{threads}|{torch.backends.cpu.get_cpu_capability()}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rate(dtype: torch.dtype, n: int, budget_s: float, slow_after_s: float = 0.0) -> float:
    """GFLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` (best of a few repeats).

    If the warm-up call alone takes longer than ``slow_after_s`` (> 0), its time is the answer:
    an emulated dtype is already known to be slow and need not be timed again.
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t0 = time.perf_counter()
    a @ b  # warm-up (and the first, possibly slow, kernel selection)
    first = time.perf_counter() - t0
    if slow_after_s > 0 and first > slow_after_s:
        return 2.0 * n**3 / first / 1e9
    reps = max(1, min(50, int(budget_s / max(first, 1e-6) / 3)))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2.0 * n**3 / best / 1e9


def cpu_matmul_rates(
    threads: int | None = None, n: int = 512, budget_s: float = 0.3, use_cache: bool = True
) -> dict[str, Any]:
    """Measured fp32 and bf16 matmul GFLOP/s on this CPU at ``threads`` (cached)."""
    threads = threads or torch.get_num_threads()
    key = _cpu_key(threads)
    path = _cache_dir() / "cpu_rates.json"
    cache: dict[str, Any] = {}
    if use_cache and path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        if key in cache and cache[key].get("n") == n:
            return cache[key]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fp32 = _rate(torch.float32, n, budget_s)
        # 4x the fp32 time of one call: bf16 is then clearly slower (emulated), stop there
        bf16 = _rate(torch.bfloat16, n, budget_s, slow_after_s=4 * 2.0 * n**3 / fp32 / 1e9)
    finally:
        torch.set_num_threads(old)
    out = {
        "n": n,
        "threads": threads,
        "fp32_gflops": fp32,
        "bf16_gflops": bf16,
        "bf16_speedup": bf16 / fp32,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if use_cache:
        cache[key] = out
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache folder only costs a re-measurement next time
    return out


def cpu_bf16_speedup(threads: int | None = None) -> float:
    """bf16 / fp32 matmul rate on this CPU (> 1: bf16 is faster)."""
    return float(cpu_matmul_rates(threads)["bf16_speedup"])


def bf16_agrees(step: Callable[[bool], tuple[torch.Tensor, list[torch.Tensor]]]) -> dict[str, Any]:
    """Run ``step(bf16)`` -> ``(loss, grads)`` in fp32 and under bf16 autocast; compare.

    Agreement = relative loss difference <= :data:`BF16_MAX_LOSS_REL` and cosine of the
    flattened gradients >= :data:`BF16_MIN_GRAD_COS`.
    """
    loss32, g32 = step(False)
    loss16, g16 = step(True)
    a = torch.cat([g.flatten().float() for g in g32])
    b = torch.cat([g.flatten().float() for g in g16])
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    rel = abs(float(loss16) - float(loss32)) / max(abs(float(loss32)), 1e-12)
    return {
        "loss_rel_diff": rel,
        "grad_cosine": cos,
        "agrees": rel <= BF16_MAX_LOSS_REL and cos >= BF16_MIN_GRAD_COS,
    }


def resolve_precision(
    precision: str,
    accelerator: str,
    check: Callable[[bool], tuple[torch.Tensor, list[torch.Tensor]]] | None = None,
) -> tuple[str, str]:
    """``(precision, why)`` for ``train.precision``; ``auto`` is decided as described above.

    ``check`` is a one-step closure for :func:`bf16_agrees` (skipped when ``None``).
    """
    if precision != "auto":
        return precision, "set in the config"
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if gpu:
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "GPU with bf16 support"
        return "32-true", "GPU without bf16 support"
    rates = cpu_matmul_rates()
    speedup = rates["bf16_speedup"]
    measured = (
        f"CPU matmul {rates['fp32_gflops']:.0f} GFLOP/s fp32 vs {rates['bf16_gflops']:.0f} "
        f"bf16 ({rates['threads']} threads, {rates['capability']})"
    )
    if speedup < BF16_MIN_SPEEDUP:
        return "32-true", f"{measured}: bf16 is not faster here"
    if check is not None:
        agree = bf16_agrees(check)
        if not agree["agrees"]:
            return "32-true", (
                f"{measured}, but a bf16 step disagrees with fp32 (loss rel. diff "
                f"{agree['loss_rel_diff']:.3g}, gradient cosine {agree['grad_cosine']:.4f})"
            )
        return "bf16-mixed", (
            f"{measured}: bf16 {speedup:.1f}x faster; a bf16 step agrees with fp32 (loss rel. "
            f"diff {agree['loss_rel_diff']:.2g}, gradient cosine {agree['grad_cosine']:.4f})"
        )
    return "bf16-mixed", f"{measured}: bf16 {speedup:.1f}x faster"
