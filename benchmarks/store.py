"""Training reads from the feature store: every reader, local disk and S3, 0 and 2 workers.

Run: ``.venv/bin/python benchmarks/store.py`` (``make bench`` runs it; ~5-10 minutes on 2
CPU cores, ~2 GB of disk under ``work/bench-store``). Writes ``benchmarks/results/store.json``
and ``store.md``.

What is measured is the trainer's own data path: random batches of 32 rows (sorted, as the
sampler yields them) through ``gap3d.trainer.data.StoreBatchDataset`` and a ``DataLoader``
with 0 or 2 worker processes, at the demo layout (50 x 1280 tokens, 32 x 384 prompt states)
and the paper layout (1374 x 1024 tokens, 128 x 2048 prompt states), float16, uncompressed.
Readers: ``fastread`` (memory-mapped shard files, local default), ``tensorstore`` (object
stores' default; also on local files), ``zarr`` (zarr-python). The reference is a NumPy
memory map of the same rows (one ``.npy`` per array) behind the same Dataset/DataLoader, and
for S3 a moto server on 127.0.0.1 (real S3 HTTP protocol, one Python process: a lower bound
for a real object store). Samples/s are the best of 3 passes; MB/s count the batch bytes the
training loop receives.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from gap3d.layout import TokenLayout  # noqa: E402
from gap3d.store import FeatureStore, ShardData, StoreSpec  # noqa: E402
from gap3d.trainer.data import StoreBatchDataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "work" / "bench-store"
FIELDS = ("image_tokens", "prompt_latents", "prompt_mask")
BLOCK = 8  # train.shuffle_block of the block-shuffled S3 runs
LAYOUTS = {
    # name: (token layout, prompt length, prompt dim, rows, samples per shard, batches)
    "demo": (TokenLayout(1, 0, 7, 7, 1280), 32, 384, 4096, 256, 48),
    "paper": (TokenLayout(1, 4, 37, 37, 1024), 128, 2048, 256, 64, 8),
}


def build_store(url: str, layout: str) -> tuple[FeatureStore, dict[str, np.ndarray]]:
    """A float16, uncompressed store of random rows; also returns the arrays for memmaps."""
    lay, L, D, n, spb, _ = LAYOUTS[layout]
    spec = StoreSpec(
        layout=lay, prompt_dim=D, prompt_max_length=L, n_shards=n // spb, samples_per_shard=spb,
        encoding="float16", compression="none",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    store = FeatureStore.create(url, spec)
    full: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS}
    for s in range(spec.n_shards):
        w = store.shard_writer(s).begin()
        for lo in range(0, spb, 64):
            k = min(64, spb - lo)
            tok = rng.standard_normal((k, lay.n_tokens, lay.channels), dtype=np.float32)
            lat = rng.standard_normal((k, L, D), dtype=np.float32)
            mask = rng.random((k, L)) < 0.7
            w.add(ShardData(tok, lat, mask, ["c"] * k, [f"{s}/{lo + i}" for i in range(k)],
                            [""] * k, ["train"] * k, [{}] * k, [""] * k,
                            np.zeros((k, 64, 64, 3), np.uint8)))  # fmt: skip
            full["image_tokens"].append(tok.astype(np.float16))
            full["prompt_latents"].append(lat.astype(np.float16))
            full["prompt_mask"].append(mask)
        w.commit()
    return store, {k: np.concatenate(v) for k, v in full.items()}


class MemmapBatches(Dataset):
    """The reference: the same batches from one ``.npy`` memory map per array."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return 0

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        if self.arrays is None:
            self.arrays = {k: np.load(self.folder / f"{k}.npy", mmap_mode="r") for k in FIELDS}
        idx = np.sort(np.asarray(rows))
        out = {k: torch.from_numpy(np.ascontiguousarray(a[idx])) for k, a in self.arrays.items()}
        out["index"] = torch.as_tensor(idx)
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "arrays": None}


def batches_of(n_rows: int, n_batches: int, seed: int, block: int = 1) -> list[list[int]]:
    """Random batches of 32 rows; ``block > 1``: made of runs of ``block`` consecutive rows,
    as ``train.shuffle_block`` draws them (fewer, contiguous reads)."""
    rng = np.random.default_rng(seed)
    starts = np.arange(0, n_rows - block + 1, block)
    return [
        sorted(
            int(r)
            for lo in rng.choice(starts, 32 // block, replace=False)
            for r in range(lo, lo + block)
        )
        for _ in range(n_batches)
    ]


def timed_pass(ds: Dataset, batches: list[list[int]], workers: int) -> tuple[float, int]:
    kw: dict[str, Any] = {"num_workers": workers}
    if workers:
        kw.update(multiprocessing_context="fork", prefetch_factor=2, persistent_workers=False)
    loader = DataLoader(ds, sampler=batches, batch_size=None, **kw)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    nbytes = 0
    for b in loader:
        nbytes += sum(b[k].numel() * b[k].element_size() for k in FIELDS)
    return time.perf_counter() - t0, nbytes


def measure(ds: Dataset, batches: list[list[int]], workers: int, repeats: int = 3) -> dict:
    best, nbytes = float("inf"), 0
    for _ in range(repeats):
        dt, nbytes = timed_pass(ds, batches, workers)
        best = min(best, dt)
    n = 32 * len(batches)
    return {"samples_per_s": n / best, "MB_per_s": nbytes / best / 1e6, "seconds": best}


def moto_server(port: int) -> subprocess.Popen:
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }  # fmt: skip
    os.environ.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="gap3d-bench")
            return proc
        except Exception:  # noqa: BLE001 - still starting
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.3)


def server_ceiling(layout: str, threads: int = 16) -> dict[str, Any]:
    """What the loopback server itself serves: concurrent GETs of one object the size of a row's
    image tokens (boto3, ``threads`` at once). A random store row costs one ranged GET per array
    (tokens, latents, mask), so rows/s on S3 cannot exceed about GETs/s / 3 on this server."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    lay, L, D, n, _, _ = LAYOUTS[layout]
    size = lay.n_tokens * lay.channels * 2
    client = boto3.client("s3")
    key = f"ceiling/{layout}.bin"
    client.put_object(Bucket="gap3d-bench", Key=key, Body=os.urandom(size))
    count = 400 if size < 1_000_000 else 96

    def get(_: int) -> int:
        return len(client.get_object(Bucket="gap3d-bench", Key=key)["Body"].read())

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(get, range(threads)))  # warm the connection pool
        t0 = time.perf_counter()
        total = sum(ex.map(get, range(count)))
        dt = time.perf_counter() - t0
    return {
        "object_bytes": size,
        "gets": count,
        "threads": threads,
        "gets_per_s": count / dt,
        "MB_per_s": total / dt / 1e6,
        "rows_per_s_bound": count / dt / 3,
    }


def prepare(layout: str, s3: bool) -> dict[str, Any]:
    """Write the layout's store locally (+ memmaps) and on S3; returns where they are."""
    n, n_batches = LAYOUTS[layout][3], LAYOUTS[layout][5]
    folder = WORK / layout
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"[{layout}] writing {n} rows ...", flush=True)
    store, full = build_store(str(folder / "features.zarr"), layout)
    for k, v in full.items():
        np.save(folder / f"{k}.npy", v)
    del full
    urls = {"local": store.url}
    if s3:
        print(f"[{layout}] writing the same rows to S3 ...", flush=True)
        urls["s3"] = build_store(f"s3://gap3d-bench/{layout}/features.zarr", layout)[0].url
    return {
        "folder": folder,
        "urls": urls,
        "batches": batches_of(n, n_batches, seed=1),
        "blocks": batches_of(n, n_batches, seed=1, block=BLOCK),
    }


def run_all(layouts: list[str], s3: bool, repeats: int) -> dict[str, Any]:
    """Every (layout, place, reader) with 2 workers first, then with 0: once this process has
    read through tensorstore it must not fork any more (tensorstore aborts a forked child)."""
    ready = {name: prepare(name, s3) for name in layouts}
    res: dict[str, Any] = {
        name: {"rows": LAYOUTS[name][3], "batches": LAYOUTS[name][5], "local": {}, "s3": {}}
        for name in layouts
    }
    for workers in (2, 0):
        for name, p in ready.items():
            batches = p["batches"]
            res[name]["local"][f"memmap/{workers}"] = measure(
                MemmapBatches(p["folder"]), batches, workers, repeats
            )
            for where, url in p["urls"].items():
                readers = (
                    ("fastread", "tensorstore", "zarr")
                    if where == "local"
                    else ("tensorstore", "zarr")
                )
                for reader in readers:
                    m = measure(StoreBatchDataset(url, reader=reader), batches, workers, repeats)
                    res[name][where][f"{reader}/{workers}"] = m
                    print(f"[{name}] {where} {reader}/{workers}: {m['samples_per_s']:.0f}/s")
                if where == "s3":  # the object-store knob: runs of consecutive rows
                    ds = StoreBatchDataset(url, reader="tensorstore")
                    m = measure(ds, p["blocks"], workers, repeats)
                    res[name][where][f"tensorstore-block{BLOCK}/{workers}"] = m
                    print(
                        f"[{name}] s3 tensorstore block {BLOCK}/{workers}: {m['samples_per_s']:.0f}/s"
                    )
    if s3:
        for name in layouts:
            res[name]["s3_ceiling"] = server_ceiling(name)
    for p in ready.values():
        shutil.rmtree(p["folder"], ignore_errors=True)
    return res


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Training reads from the feature store",
        "",
        f"Generated by `benchmarks/store.py` on {res['when']} ({res['machine']}; load average "
        f"{res['load_before']} before, {res['load_after']} after). Random batches of 32 through "
        "the trainer's Dataset and a DataLoader (fork workers); float16 rows as the training "
        "loop receives them; best of 3 passes. S3 = a moto server on 127.0.0.1.",
        "",
        "| layout | where | reader | workers | samples/s | MB/s | x memmap (same workers) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for layout, r in res["layouts"].items():
        for where in ("local", "s3"):
            for key, m in r[where].items():
                reader, w = key.split("/")
                ref = r["local"][f"memmap/{w}"]["samples_per_s"]
                ratio = m["samples_per_s"] / ref
                lines.append(
                    f"| {layout} | {where} | {reader} | {w} | {m['samples_per_s']:.0f} | "
                    f"{m['MB_per_s']:.0f} | {ratio:.2f} |"
                )
    lines += ["", "## Targets", ""]
    for layout, r in res["layouts"].items():
        loc = r["local"]
        for reader in ("fastread", "tensorstore"):
            ratio = loc[f"{reader}/2"]["samples_per_s"] / loc["memmap/2"]["samples_per_s"]
            lines.append(
                f"- {layout}, local, {reader}, 2 workers: **{ratio:.2f}x** memmap (>= 0.8)"
            )
        if r["s3"]:
            best_local = max(loc[f"{x}/2"]["samples_per_s"] for x in ("fastread", "tensorstore"))
            ratio = r["s3"]["tensorstore/2"]["samples_per_s"] / best_local
            lines.append(
                f"- {layout}, S3 tensorstore vs local, 2 workers: **{ratio:.2f}x** (>= 0.3)"
            )
        c = r.get("s3_ceiling")
        if c:
            lines.append(
                f"- {layout}, the loopback server alone: {c['gets_per_s']:.0f} GETs/s of "
                f"{c['object_bytes'] / 1e3:.0f} kB ({c['MB_per_s']:.0f} MB/s, {c['threads']} "
                f"threads): at most ~{c['rows_per_s_bound']:.0f} random rows/s (3 arrays a row)"
            )
        ts_fr = loc["tensorstore/0"]["samples_per_s"] / loc["fastread/0"]["samples_per_s"]
        lines.append(f"- {layout}, local, tensorstore vs fastread, 0 workers: {ts_fr:.2f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layouts", default="demo,paper")
    ap.add_argument("--no-s3", action="store_true", help="skip the loopback S3 runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--ceiling-only",
        action="store_true",
        help="only measure the loopback server's own GET rate into the existing results",
    )
    args = ap.parse_args()
    if args.ceiling_only:
        from gap3d.pipeline.server import free_port

        out = ROOT / "benchmarks" / "results"
        res = json.loads((out / "store.json").read_text())
        server = moto_server(free_port())
        try:
            for name in res["layouts"]:
                res["layouts"][name]["s3_ceiling"] = server_ceiling(name)
        finally:
            server.terminate()
        (out / "store.json").write_text(json.dumps(res, indent=1))
        (out / "store.md").write_text(markdown(res))
        print(markdown(res))
        return
    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)
    server = None
    if not args.no_s3:
        from gap3d.pipeline.server import free_port

        server = moto_server(free_port())
    res: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "load_before": round(os.getloadavg()[0], 2),
        "layouts": {},
    }
    try:
        res["layouts"] = run_all(args.layouts.split(","), server is not None, args.repeats)
    finally:
        if server is not None:
            server.terminate()
    res["load_after"] = round(os.getloadavg()[0], 2)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "store.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "store.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
