"""Training data path and step-time benchmark; writes ``benchmarks/results/train.json``.

1. Throughput of reading cached features in random order through the trainer's data path
   (``gap3d.trainer.data``: one sorted ``store.read`` per batch from the Zarr store) against
   the same features as webdataset tars of ``.npy`` files (shard shuffle + sample shuffle
   buffer: webdataset cannot read randomly) and as NumPy memmaps (sorted fancy indexing), at
   the demo layout (50 x 1280 tokens, 32 x 384 latents, float16) and optionally a paper-like
   one (1374 x 1024 tokens, 128 x 2048 latents). Targets: Zarr >= 1.5x webdataset and
   >= 0.8x memmap. Files are freshly written, so all read from the page cache. Zarr variants
   in the same run: ``zarr`` = uncompressed feature arrays through the trainer's default
   reader (``reader=auto``), ``zarr-zstd`` = zstd store, default reader, ``zarr-python`` =
   zstd store read through zarr-python (``reader=zarr``); ``benchmarks/store.py`` compares the
   reader backends themselves, locally and on S3. Every reader casts float16 to float32 with torch (~4x faster
   than numpy's ``astype`` here), so the comparison measures reading, not the cast.
2. Training step time at the demo preset on cached tensors vs. a step that first runs the
   demo encoders live (EfficientNet-Lite0 on 224 px images + MiniLM on the captions).
3. Peak RSS of each measurement (each runs in a fresh spawned process).
4. Model FLOPs utilisation of the training step (``benchmarks/train_step.py``): analytic
   FLOPs per step / step time / the matmul peak measured in the same run, fp32 and bf16.

Run: ``.venv/bin/python benchmarks/train.py [--n 2048] [--paper-n 256] [--workers 0 2]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
# name: (n_cls, n_registers, grid_h, grid_w, channels, prompt_len, prompt_dim)
LAYOUTS = {"demo": (1, 0, 7, 7, 1280, 32, 384), "paper": (1, 4, 37, 37, 1024, 128, 2048)}
BATCH = 32
PER_SHARD = 256
ZARR_DIRS = {"none": "features.zarr", "zstd": "features-zstd.zarr"}
KINDS = ("zarr", "zarr-zstd", "zarr-python", "webdataset", "memmap")


# ------------------------------------------------------------------------------ writing


def synthetic(n: int, layout: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Feature-like float16 arrays (N(0, 1) tokens and latents) and ragged prompt masks."""
    c, r, h, w, ch, length, dim = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, length + 1, n)
    tok = rng.standard_normal((n, c + r + h * w, ch), dtype=np.float32).astype(np.float16)
    lat = rng.standard_normal((n, length, dim), dtype=np.float32).astype(np.float16)
    return {
        "image_tokens": tok,
        "prompt_latents": lat,
        "prompt_mask": np.arange(length)[None] < lengths[:, None],
    }


def write_all(root: Path, layout: str, n: int) -> dict[str, Any]:
    """The same samples as a Zarr store, webdataset tars and NumPy files."""
    import webdataset as wds

    from gap3d.layout import TokenLayout
    from gap3d.store import FeatureStore, ShardData
    from gap3d.store.manifest import StoreSpec

    c, r, h, w, ch, length, dim = LAYOUTS[layout]
    lay = TokenLayout(c, r, h, w, ch)
    per_shard = min(PER_SHARD, n)
    n_shards = -(-n // per_shard)
    data = synthetic(n, layout)
    stores = [
        FeatureStore.create(
            root / ZARR_DIRS[compression],
            StoreSpec(
                layout=lay,
                prompt_dim=dim,
                prompt_max_length=length,
                n_shards=n_shards,
                samples_per_shard=per_shard,
                compression=compression,
            ),
        )
        for compression in ("none", "zstd")
    ]
    (root / "wds").mkdir()
    for s in range(n_shards):
        sl = slice(s * per_shard, min(n, (s + 1) * per_shard))
        k = sl.stop - sl.start
        for store in stores:
            store.write_shard(
                s,
                ShardData(
                    image_tokens=data["image_tokens"][sl],
                    prompt_latents=data["prompt_latents"][sl],
                    prompt_mask=data["prompt_mask"][sl],
                    caption=["x"] * k,
                    key=[str(i) for i in range(sl.start, sl.stop)],
                    url=[""] * k,
                    split=["train"] * k,
                    meta=[{}] * k,
                    reason=[""] * k,
                    thumbnail=np.zeros((k, 64, 64, 3), np.uint8),
                ),
            )
        with wds.TarWriter(str(root / "wds" / f"{s:05d}.tar")) as tw:
            for i in range(sl.start, sl.stop):
                tw.write(
                    {
                        "__key__": f"{i:08d}",
                        "tokens.npy": data["image_tokens"][i],
                        "latents.npy": data["prompt_latents"][i],
                        "mask.npy": data["prompt_mask"][i],
                    }
                )
    (root / "npy").mkdir()
    for name, arr in data.items():
        np.save(root / "npy" / f"{name}.npy", arr)

    def du(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    return {
        "n": n,
        "layout": layout,
        "bytes_per_sample_f16": int(sum(a[0].nbytes for a in data.values())),
        "disk_bytes": {
            "zarr": du(root / ZARR_DIRS["none"]),
            "zarr_zstd": du(root / ZARR_DIRS["zstd"]),
            "webdataset": du(root / "wds"),
            "memmap": du(root / "npy"),
        },
    }


# ------------------------------------------------------------------------------ readers


class MemmapBatches:
    """``dataset[rows]`` -> batch from ``.npy`` memmaps (sorted fancy indexing)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._arrays: dict[str, np.ndarray] | None = None  # opened lazily, per process

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_arrays": None}  # a pickled memmap would copy the data

    def __getitem__(self, rows: list[int]) -> dict[str, Any]:
        import torch

        if self._arrays is None:
            self._arrays = {
                name: np.load(self.folder / f"{name}.npy", mmap_mode="r")
                for name in ("image_tokens", "prompt_latents", "prompt_mask")
            }
        idx = np.sort(np.asarray(rows))
        out = {}
        for name, a in self._arrays.items():
            x = torch.from_numpy(a[idx])
            out[name] = x.float() if x.dtype == torch.float16 else x
        return out


def _wds_sample(s: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        "image_tokens": torch.from_numpy(s["tokens.npy"]).float(),
        "prompt_latents": torch.from_numpy(s["latents.npy"]).float(),
        "prompt_mask": torch.from_numpy(s["mask.npy"]),
    }


def build_loader(kind: str, root: Path, workers: int) -> Any:
    import torch
    import webdataset as wds

    from gap3d.trainer.data import StepBatchSampler, StoreBatchDataset, make_loader

    n = len(np.load(root / "npy" / "prompt_mask.npy", mmap_mode="r"))
    block = int(kind.split("block")[1]) if "block" in kind else 1
    sampler = StepBatchSampler(np.arange(n), BATCH, seed=0, block=block)
    if kind.startswith("zarr"):
        folder = ZARR_DIRS["none" if kind == "zarr" else "zstd"]
        reader = "zarr" if kind == "zarr-python" else "auto"
        ds = StoreBatchDataset(root / folder, reader=reader)
        return make_loader(ds, sampler, workers, "fork")
    if kind == "memmap":
        return make_loader(MemmapBatches(root / "npy"), sampler, workers, "fork")  # type: ignore[arg-type]
    urls = sorted(str(p) for p in (root / "wds").glob("*.tar"))
    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False, seed=0)
        .shuffle(1000)
        .decode()
        .map(_wds_sample)
        .batched(BATCH, partial=False)
    )
    kwargs = {"multiprocessing_context": "fork"} if workers else {}
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, **kwargs)


def read_throughput(kind: str, root: str, workers: int, bytes_per_sample: int) -> dict[str, Any]:
    """One pass over all samples in random order; samples/s and MB/s of float16 features."""
    import torch

    torch.set_num_threads(1)
    loader = build_loader(kind, Path(root), workers)
    t0, n, first, n_first = time.perf_counter(), 0, None, 0
    for b in loader:
        n += len(b["image_tokens"])
        if first is None:
            first, n_first = time.perf_counter() - t0, n
    dt = time.perf_counter() - t0
    return {
        "samples": n,
        "seconds": dt,
        "first_batch_s": first,
        "samples_per_s": n / dt,
        # after the first batch: without opening the store / starting workers, a one-off
        # cost per process that a pass of a few hundred ms over 2048 samples over-weights
        "steady_samples_per_s": (n - n_first) / (dt - first) if first and dt > first else None,
        "MB_per_s": n * bytes_per_sample / dt / 1e6,
    }


def zarr_breakdown(root: str, kind: str = "zarr", repeats: int = 8) -> dict[str, Any]:
    """Where a random Zarr batch spends its time: per field, and scattered vs. contiguous rows
    (the difference is the per-request cost, as decoding work is the same)."""
    from gap3d.store import FeatureStore

    store = FeatureStore.open(
        Path(root) / ZARR_DIRS["none" if kind == "zarr" else "zstd"],
        reader="zarr" if kind == "zarr-python" else "auto",
    )
    n, rng = len(store.indices()), np.random.default_rng(1)

    def ms(fields: list[str], contiguous: bool) -> float:
        times = []
        for _ in range(repeats):
            if contiguous:
                lo = int(rng.integers(0, n - BATCH))
                rows = np.arange(lo, lo + BATCH)
            else:
                rows = np.sort(rng.choice(n, BATCH, replace=False))
            t0 = time.perf_counter()
            store.read(rows, fields=fields)
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    out = {}
    for f in ("image_tokens", "prompt_latents", "prompt_mask"):
        out[f"{f}_random_ms"] = ms([f], False)
        out[f"{f}_contiguous_ms"] = ms([f], True)
    out["all_random_ms"] = ms(["image_tokens", "prompt_latents", "prompt_mask"], False)
    out["batch"] = BATCH
    return out


# ------------------------------------------------------------------------------ train step


def step_time(root: str, steps: int) -> dict[str, Any]:
    """Seconds per demo-preset training step (batch 32): on cached tensors, and with the demo
    encoders run live first. Both kinds alternate in one process, so machine load hits both."""
    import skimage.data
    import torch
    from PIL import Image

    from gap3d.config import load_config
    from gap3d.encoders import build_image_encoder, build_prompt_encoder
    from gap3d.store import FeatureStore
    from gap3d.trainer.module import AlignerModule
    from gap3d.trainer.train import store_info

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cfg = load_config("demo")
    store = FeatureStore.open(Path(root) / ZARR_DIRS["none"])
    ch = store.layout.channels
    stats = {
        "cls_mean": np.zeros(ch),
        "cls_std": np.ones(ch),
        "patch_mean": np.zeros(ch),
        "patch_std": np.ones(ch),
    }
    module = AlignerModule(cfg.to_dict(), store_info(store, root), "", stats=stats)
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
    batch = store.read(np.arange(BATCH), fields=["image_tokens", "prompt_latents", "prompt_mask"])
    prompt_enc, image_enc = (
        build_prompt_encoder(cfg.prompt_encoder),
        build_image_encoder(cfg.image_encoder),
    )
    photo = Image.fromarray(skimage.data.astronaut())
    rng = np.random.default_rng(0)
    images = [
        photo.crop((x, y, x + 300, y + 300)).resize((224, 224))
        for x, y in rng.integers(0, 200, (BATCH, 2))
    ]
    captions = [f"photo {i} of an astronaut in a white suit" for i in range(BATCH)]

    def train_step(tokens: Any, lat: Any, mask: Any, i: int) -> None:
        x0 = module.normalizer.normalize(tokens.float())
        loss, _ = module.flow.loss(
            x0, lat.float(), mask.bool(), generator=torch.Generator().manual_seed(i)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    cached, live, enc = [], [], []
    for i in range(steps + 1):  # the first round warms up both
        t0 = time.perf_counter()
        train_step(
            torch.from_numpy(batch["image_tokens"]),
            torch.from_numpy(batch["prompt_latents"]),
            torch.from_numpy(batch["prompt_mask"]),
            i,
        )
        t1 = time.perf_counter()
        with torch.no_grad():
            pb = prompt_enc.encode(captions)
            tokens = image_enc.encode(images)
        t2 = time.perf_counter()
        train_step(tokens, pb.hidden, pb.mask, i)
        t3 = time.perf_counter()
        if i:
            cached.append(t1 - t0)
            enc.append(t2 - t1)
            live.append(t3 - t1)
    # Minimum over repeats: the least disturbed run on a shared machine (medians as well).
    return {
        "cached_step_s": min(cached),
        "live_step_s": min(live),
        "encoders_s": min(enc),
        "cached_step_s_median": float(np.median(cached)),
        "live_step_s_median": float(np.median(live)),
        "encoders_s_median": float(np.median(enc)),
        "steps": steps,
        "threads": torch.get_num_threads(),
        "aligner_params_M": sum(p.numel() for p in module.net.parameters()) / 1e6,
    }


# ------------------------------------------------------------------------------ driver


def _measure(fn: Any, *args: Any) -> dict[str, Any]:
    """Run ``fn`` in a fresh spawned process; add its peak RSS (and its workers')."""
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        return ex.submit(_with_rss, fn, *args).result()


def _with_rss(fn: Any, *args: Any) -> dict[str, Any]:
    out = fn(*args)
    # VmHWM (peak RSS of this process image), not ru_maxrss: Linux keeps ru_maxrss across
    # the exec of a spawned process, so it would report the parent's peak.
    status = Path("/proc/self/status")
    if status.exists():
        hwm = [ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")]
        out["peak_rss_MB"] = int(hwm[0].split()[1]) / 1024 if hwm else None
    else:
        out["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_rss_workers_MB"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def bench_layout(
    layout: str, n: int, workers: list[int], tmp: Path, repeats: int = 2
) -> dict[str, Any]:
    root = tmp / layout
    root.mkdir()
    t0 = time.perf_counter()
    info = write_all(root, layout, n)
    info["write_s"] = time.perf_counter() - t0
    reads: dict[str, Any] = {}
    for w in workers:
        for kind in KINDS:
            # best of `repeats` passes: the least disturbed one on a shared machine
            runs = [
                _measure(read_throughput, kind, str(root), w, info["bytes_per_sample_f16"])
                for _ in range(repeats)
            ]
            r = max(runs, key=lambda x: x["samples_per_s"])
            r["samples_per_s_all"] = [x["samples_per_s"] for x in runs]
            r["steady_samples_per_s"] = max(x["steady_samples_per_s"] or 0.0 for x in runs)
            reads[f"{kind}/workers={w}"] = r
            print(
                f"  {layout:6s} {kind:11s} workers={w}: {r['samples_per_s']:8.0f} samples/s "
                f"(after batch 1: {r['steady_samples_per_s']:6.0f}) "
                f"{r['MB_per_s']:7.1f} MB/s  peak RSS {r['peak_rss_MB']:.0f} MB",
                flush=True,
            )
        sps = {k: reads[f"{k}/workers={w}"]["samples_per_s"] for k in KINDS}
        steady = {k: reads[f"{k}/workers={w}"]["steady_samples_per_s"] for k in KINDS}
        wd, mm = sps["webdataset"], sps["memmap"]
        ratios: dict[str, float] = {"target_vs_webdataset": 1.5, "target_vs_memmap": 0.8}
        for k in ("zarr", "zarr-zstd", "zarr-python"):
            key = k.replace("-", "_")
            ratios[f"{key}_vs_webdataset"] = sps[k] / wd
            ratios[f"{key}_vs_memmap"] = sps[k] / mm
            ratios[f"{key}_vs_webdataset_steady"] = steady[k] / steady["webdataset"]
            ratios[f"{key}_vs_memmap_steady"] = steady[k] / steady["memmap"]
        reads[f"ratios/workers={w}"] = ratios
        print(
            f"  {layout:6s} ratios workers={w}: "
            + ", ".join(
                f"{k} {sps[k] / wd:.2f}x webdataset {sps[k] / mm:.2f}x memmap (after batch 1: "
                f"{steady[k] / steady['webdataset']:.2f}x, {steady[k] / steady['memmap']:.2f}x)"
                for k in ("zarr", "zarr-zstd", "zarr-python")
            ),
            flush=True,
        )
    info["reads"] = reads
    info["zarr_breakdown"] = {}
    for kind in ("zarr", "zarr-zstd", "zarr-python"):
        info["zarr_breakdown"][kind] = bd = _measure(zarr_breakdown, str(root), kind)
        print(
            f"  {layout:6s} {kind} batch of {BATCH}, ms (random / contiguous rows): "
            + ", ".join(
                f"{f} {bd[f + '_random_ms']:.1f}/{bd[f + '_contiguous_ms']:.1f}"
                for f in ("image_tokens", "prompt_latents", "prompt_mask")
            ),
            flush=True,
        )
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048, help="samples at the demo layout")
    p.add_argument("--paper-n", type=int, default=0, help="samples at the paper layout (0: skip)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=2, help="passes per reader (best is kept)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--mfu-only", action="store_true", help="only the step MFU (part 4)")
    p.add_argument("--compile", action="store_true", help="MFU: also time torch.compile")
    args = p.parse_args()
    if args.mfu_only:
        _mfu(args, {})
        return
    tmp = Path(tempfile.mkdtemp(prefix="gap3d-bench-train-"))
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
        },
        "batch_size": BATCH,
        "notes": "reads from the page cache (files freshly written); samples/s over one "
        "random-order pass; MB/s counts float16 feature bytes",
    }
    try:
        print("data path (random order, batch 32):")
        result["demo"] = bench_layout("demo", args.n, args.workers, tmp, args.repeats)
        if args.paper_n:
            result["paper"] = bench_layout("paper", args.paper_n, args.workers, tmp, args.repeats)
        print("training step, demo preset (cached tensors vs live encoders):")
        st = _measure(step_time, str(tmp / "demo"), args.steps)
        # what caching saves: the encoder share of a live step (min over repeats each)
        st["saving"] = st["encoders_s"] / (st["encoders_s"] + st["cached_step_s"])
        result["train_step"] = st
        print(
            f"  cached {st['cached_step_s']:.2f} s/step, live {st['live_step_s']:.2f} s/step "
            f"(encoders {st['encoders_s']:.2f} s): caching saves {st['saving']:.0%}; "
            f"peak RSS {st['peak_rss_MB']:.0f} MB"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    _mfu(args, result)


def _mfu(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Part 4: the step's MFU, written to ``train_step.{json,md}`` (and into train.json)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_step

    print("training step MFU, demo preset:")
    cmd = "python benchmarks/train.py" + (" --mfu-only" if args.mfu_only else "")
    res = train_step.run(steps=args.steps, compile_=args.compile, command=cmd)
    out = args.out.parent / "train_step.json"
    out.write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(train_step.markdown(res))
    if result:
        result["train_step_mfu"] = res
        args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
