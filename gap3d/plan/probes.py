"""Measurements that need a process of their own: peak memory is a property of a process.

:func:`run_probe` starts ``python -m gap3d.plan.probes NAME IN OUT`` (a fresh interpreter, as
``gap3d train`` would be), waits, and returns the probe's JSON result with the process's peak
resident memory. Probes:

* ``train_run``: the real ``gap3d.trainer.train.train`` on a store, with a callback that times
  its phases (start-up, every step, validation, checkpoint writes, export), passed through
  ``train(callbacks=...)``; checkpoint writes are timed by wrapping ``Trainer.save_checkpoint``
  inside the probe process only.
* ``train_step``: one aligner configuration (``AlignerNet`` + ``FlowMatching`` + AdamW +
  ``EMA``, as Lightning steps them) on random tensors of the store's shapes: step time,
  optimiser share, peak memory (``torch.cuda.max_memory_allocated`` on a GPU, resident memory
  on a CPU) and the time of one guided Euler sampling step. Needs no store, so it also runs
  at paper shapes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_T0 = time.perf_counter()  # the probe process's start (for start-up times)


class ProbeError(RuntimeError):
    """A probe process failed; the message carries the end of its log."""


def run_probe(
    name: str, payload: dict[str, Any], workdir: str | Path, timeout_s: float = 3600
) -> dict[str, Any]:
    """Run probe ``name`` in a fresh Python process; its output goes to ``workdir/NAME.log``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = payload.get("tag", name)
    src, dst, log = (workdir / f"{tag}.{k}" for k in ("in.json", "out.json", "log"))
    src.write_text(json.dumps(payload))
    dst.unlink(missing_ok=True)
    env = dict(os.environ)
    # The probe must import this very gap3d (a source checkout may not be installed).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gap3d.plan.probes", name, str(src), str(dst)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this very child
        except BaseException:  # interrupted: do not leave the probe running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            timer.cancel()
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0 or not dst.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise ProbeError(f"probe {tag} failed (exit {code}); log {log}:\n{tail}")
    out = json.loads(dst.read_text())
    out["process_wall_s"] = wall
    out["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    return out


def _peak_rss() -> int:
    """Peak resident memory of this process (bytes; Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def current_rss() -> int:
    """Resident memory of this process now (bytes)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def _cuda_peaks(device: str) -> dict[str, int]:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return {}
    return {
        "cuda_peak_allocated": int(torch.cuda.max_memory_allocated()),
        "cuda_peak_reserved": int(torch.cuda.max_memory_reserved()),
    }


# --------------------------------------------------------------------------------------------
# train_run: the real trainer, timed by phase
# --------------------------------------------------------------------------------------------


def _phase_timer() -> Any:
    import lightning.pytorch as pl

    class PhaseTimer(pl.Callback):
        """Wall-clock marks of a fit (perf_counter seconds since the probe started)."""

        def __init__(self) -> None:
            self.marks: dict[str, Any] = {"step_end": [], "val": [], "ckpt": []}
            self._val0: list[float] = [0.0, 0.0]

        @staticmethod
        def now() -> list[float]:
            """[wall seconds since the probe started, CPU seconds of this process]."""
            return [time.perf_counter() - _T0, time.process_time()]

        def on_fit_start(self, trainer: Any, module: Any) -> None:
            self.marks["fit_start"] = self.now()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.marks["step_end"].append(self.now())

        def on_validation_start(self, trainer: Any, module: Any) -> None:
            self._val0 = self.now()

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            self.marks["val"].append([self._val0, self.now()])  # [[wall, cpu], [wall, cpu]]

        def on_fit_end(self, trainer: Any, module: Any) -> None:
            self.marks["fit_end"] = self.now()

    return PhaseTimer()


def probe_train_run(payload: dict[str, Any]) -> dict[str, Any]:
    """``train.train(cfg)`` with phase marks; ``payload["config"]`` is a config dict."""
    import lightning.pytorch as pl
    import torch

    from gap3d.config import config_from_dict
    from gap3d.trainer import train as train_mod

    if payload.get("torch_threads"):
        torch.set_num_threads(int(payload["torch_threads"]))
    cfg = config_from_dict(payload["config"], source="<bench train_run>")
    timer = _phase_timer()
    # the phase timer rides along as a Lightning callback; checkpoint writes are timed by
    # wrapping the trainer's save (Lightning has no hook around the write itself)
    save = pl.Trainer.save_checkpoint

    def timed_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = timer.now()
        out = save(self, *args, **kwargs)
        timer.marks["ckpt"].append([t0, timer.now()])
        return out

    pl.Trainer.save_checkpoint = timed_save  # type: ignore[method-assign]
    result = train_mod.train(cfg, export=bool(payload.get("export", True)), callbacks=[timer])
    t_done = [time.perf_counter() - _T0, time.process_time()]
    device = "cuda" if torch.cuda.is_available() and cfg.train.accelerator != "cpu" else "cpu"
    return {
        "hooked": True,
        "marks": timer.marks,  # every mark is [wall s since start, process CPU s]
        "done": t_done,
        "steps": int(result["step"]),
        "wall_s": float(result["wall_s"]),
        "exported": bool(result.get("export_dir")),
        "peak_rss": _peak_rss(),
        **_cuda_peaks(device),
    }


# --------------------------------------------------------------------------------------------
# train_step: one aligner configuration on random tensors
# --------------------------------------------------------------------------------------------


def probe_train_step(payload: dict[str, Any]) -> dict[str, Any]:
    """Step time, peak memory and Euler-step time of one aligner configuration."""
    import torch

    from gap3d.config import AlignerConfig, LossWeights
    from gap3d.layout import TokenLayout
    from gap3d.plan.trace import autocast_for
    from gap3d.trainer.ema import EMA
    from gap3d.trainer.flow import FlowMatching
    from gap3d.trainer.model import AlignerNet

    if payload.get("torch_threads"):
        torch.set_num_threads(int(payload["torch_threads"]))
    device = torch.device(payload.get("device", "cpu"))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    lay = TokenLayout.from_dict(payload["layout"])
    B, L, D = int(payload["batch"]), int(payload["prompt_len"]), int(payload["prompt_dim"])
    precision = payload.get("precision", "32-true")
    rss_start = current_rss()
    torch.manual_seed(0)
    net = AlignerNet(lay, D, AlignerConfig(**payload["aligner"])).to(device)
    net.train()
    net.grad_checkpointing = bool(payload.get("grad_ckpt", False))
    flow = FlowMatching(net, lay, LossWeights())
    ema = EMA(net, 0.999, warmup=True)
    ema.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=payload.get("wd", 0.0))
    rss_model = current_rss()
    gen = torch.Generator(device=device).manual_seed(0)

    def batch() -> tuple[Any, Any, Any]:
        x0 = torch.randn(B, lay.n_tokens, lay.channels, device=device, generator=gen)
        cond = torch.randn(B, L, D, device=device, generator=gen)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        return x0, cond, mask

    def step() -> tuple[float, float]:
        x0, cond, mask = batch()
        sync()
        t0 = time.perf_counter()
        with autocast_for(precision, device.type):
            loss, _ = flow.loss(x0, cond, mask, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net)
        sync()
        return t1 - t0, time.perf_counter() - t1

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up: optimiser state, kernel selection, allocator pools
    # At least `steps` timed steps and at least ~2 s of them (short steps are noisy), <= 50.
    times = [step()]
    while len(times) < 50 and (
        len(times) < int(payload.get("steps", 2)) or sum(map(sum, times)) < 2.0
    ):
        times.append(step())
    n = len(times)
    fwd_bwd = sum(t[0] for t in times) / n
    opt_s = sum(t[1] for t in times) / n
    peaks = _cuda_peaks(str(device))
    rss_train = _peak_rss()
    out: dict[str, Any] = {
        "batch": B,
        "grad_ckpt": net.grad_checkpointing,
        "precision": precision,
        "step_s": fwd_bwd + opt_s,
        "fwd_bwd_s": fwd_bwd,
        "opt_ema_s": opt_s,
        "steps_timed": n,
        "rss_start": rss_start,
        "rss_model": rss_model,
        "peak_rss_train": rss_train,
        **peaks,
    }
    k = int(payload.get("sample_steps", 0))
    if k > 0:
        net.eval()
        x0, cond, mask = batch()
        with torch.no_grad(), autocast_for(precision, device.type):
            flow.sample(cond, mask, steps=1, cfg_scale=float(payload.get("cfg_scale", 3.0)))
            sync()
            t0 = time.perf_counter()
            flow.sample(cond, mask, steps=k, cfg_scale=float(payload.get("cfg_scale", 3.0)))
            sync()
        out["sample_step_s"] = (time.perf_counter() - t0) / k
        out["sample_batch"] = B
    out["peak_rss"] = _peak_rss()
    return out


PROBES = {"train_run": probe_train_run, "train_step": probe_train_step}


def main(argv: list[str]) -> int:
    name, src, dst = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    payload = json.loads(Path(src).read_text())
    result = PROBES[name](payload)
    tmp = Path(dst).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
