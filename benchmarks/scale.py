"""Scale benchmark: metadata, statistics and memory that must not grow with the store.

Run: ``.venv/bin/python benchmarks/scale.py`` (``make bench`` runs it; ~10-20 minutes and
~8 GB of disk under ``work/bench-scale`` on 2 CPU cores). Writes
``benchmarks/results/scale.json`` and ``scale.md``. Sections:

1. **index**: a synthetic store of ``--rows`` (default 1 000 000) rows at the paper layout
   (DINOv2-L/14-reg 1374 x 1024 int8 tokens, Qwen2.5-VL 128 x 2048 prompt states, 1024 rows
   per shard). Metadata (commit records, per-row columns, partial moments) is written for
   every shard; token files only for one shard, so it fits on disk. Measured in a fresh
   process: open the store + build the index + the train/val split + rank 0's view of an
   8-rank run (first epoch order and batch). The same with the v0.1 code (the commit given by
   ``--old-rev``, checked out with ``git worktree``) on a v0.1 store of the same size, beside it.
2. **encode_rss**: peak RSS of one encode task (``workers.encode_shard``, the real task) at the
   paper layout, with stand-in encoders that return tensors of the real output shapes (no
   model weights: this measures the task's own memory), for ``samples_per_shard`` 256 and
   2048, each in a fresh process.
3. **rerun**: ``gap3d cache`` (the stage's ``cache()``) over an already complete store of 1000
   shards: wall time and bytes read by the process (``psutil`` read_chars), in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "work" / "bench-scale"
RESULTS = ROOT / "benchmarks" / "results"
S = 1024  # rows per shard at paper scale (configs/paper.yaml)
PAPER = {"layout": (1, 4, 37, 37, 1024), "prompt": (128, 2048)}


# ---------------------------------------------------------------------------------- 1. index
BUILD_V2 = r"""
import json, sys, time, numpy as np
from gap3d.layout import TokenLayout
from gap3d.store import FeatureStore, StoreSpec, ShardData
from gap3d.store import commits
path, n_shards, S, token_shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spec = StoreSpec(layout=TokenLayout(1, 4, 37, 37, 1024), prompt_dim=2048, prompt_max_length=128,
                 n_shards=n_shards, samples_per_shard=S, encoding="int8", compression="none",
                 prompt_encoder={"name": "qwen2_5_vl"}, image_encoder={"name": "dinov2_reg"})
store = FeatureStore.create(path, spec)
rng = np.random.default_rng(0)
t0 = time.time()
for s in range(n_shards):
    keys = [f"{s:05d}/{i:07d}" for i in range(S)]
    split = np.where(rng.random(S) < 0.02, 1, 0).astype(np.int8)
    valid = rng.random(S) > 0.01
    if s < token_shards:  # real token files through the streaming writer
        w = store.shard_writer(s).begin()
        for lo in range(0, S, 64):
            n = 64
            w.add(ShardData(rng.standard_normal((n, 1374, 1024), dtype=np.float32),
                            rng.standard_normal((n, 128, 2048), dtype=np.float32),
                            np.ones((n, 128), bool), ["a caption"] * n, keys[lo:lo + n], [""] * n,
                            ["heldout" if c else "train" for c in split[lo:lo + n]], [{}] * n,
                            ["" if v else "image_corrupt" for v in valid[lo:lo + n]],
                            np.zeros((n, 64, 64, 3), np.uint8)))
        w.commit()
        continue
    # metadata only: the columns, the partial moments and the record, as a writer leaves them
    lo = s * S
    store.raw("valid")[lo:lo + S] = valid
    store.raw("split")[lo:lo + S] = split
    for name, values in (("caption", ["a photo of something"] * S), ("key", keys),
                         ("url", [f"https://example.com/{k}.jpg" for k in keys]),
                         ("meta", ["{}"] * S), ("reason", ["" if v else "image_corrupt" for v in valid])):
        store.raw(name)[lo:lo + S] = np.array(values, dtype=object)
    store.raw("moments/mean")[s] = rng.standard_normal((3, 1024))
    store.raw("moments/m2")[s] = rng.random((3, 1024)) * 1000
    n_train = int((valid & (split == 0)).sum())
    rec = commits.new_record(s, n_samples=S, n_valid=int(valid.sum()),
                             reasons={"image_corrupt": int((~valid).sum())},
                             splits={"train": n_train, "heldout": int((valid & (split == 1)).sum())},
                             rows=commits.encode_rows(valid, split, keys),
                             moments={"count": {"cls": n_train, "register": 4 * n_train, "patch": 1369 * n_train}},
                             source={"url": f"s3://bucket/shards/{s:05d}.tar", "fingerprint": {"size": 1, "etag": str(s)}})
    commits.write_record(store.zarr_store, s, rec)
print(json.dumps({"seconds": time.time() - t0}))
"""

MEASURE_V2 = r"""
import json, resource, sys, time
import numpy as np
from gap3d.store import FeatureStore
from gap3d.trainer.sampler import StepBatchSampler
from gap3d.trainer import split as splits
from gap3d.store.manifest import SPLIT_CODES
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
t0 = time.perf_counter()
store = FeatureStore.open(sys.argv[1])
t_open = time.perf_counter()
index = store.index()
t_index = time.perf_counter()
cand = index.valid & (index.split == SPLIT_CODES["train"])
rows = index.rows[cand]
score = splits.scores(index.key_hash[cand], 0)
rule = splits.make_rule(score, 0, 64)
train, val = splits.split_rows(rows, score, rule)
t_split = time.perf_counter()
view = StepBatchSampler(train, 16, seed=0, rank=0, world_size=8)
first = view.batch(0)
t_view = time.perf_counter()
print(json.dumps({"rows": int(len(store)), "samples": int(len(index)), "train": int(len(train)),
  "val": int(len(val)), "shards": store.n_shards, "open_s": t_open - t0, "index_s": t_index - t_open,
  "split_s": t_split - t_index, "view_s": t_view - t_split, "total_s": t_view - t0,
  "rss_imports_mb": base, "rss_peak_mb": rss(), "rss_added_mb": rss() - base}))
"""

BUILD_V1 = r"""
import json, sys, time, numpy as np, zarr
from pathlib import Path
from gap3d.layout import TokenLayout
from gap3d.pipeline.store import FeatureStore
from gap3d.pipeline.store_manifest import StoreSpec
from gap3d.pipeline.store_files import write_marker
path, n_shards, S = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
spec = StoreSpec(layout=TokenLayout(1, 4, 37, 37, 1024), prompt_dim=2048, prompt_max_length=128,
                 n_shards=n_shards, samples_per_shard=S, encoding="int8", compression="none")
store = FeatureStore.create(path, spec)
rng = np.random.default_rng(0)
for s in range(n_shards):
    lo = s * S
    split = np.where(rng.random(S) < 0.02, "heldout", "train")
    valid = rng.random(S) > 0.01
    keys = [f"{s:05d}/{i:07d}" for i in range(S)]
    store.raw("valid")[lo:lo + S] = valid
    for name, values in (("split", list(split)), ("caption", ["a photo of something"] * S), ("key", keys),
                         ("url", [f"https://example.com/{k}.jpg" for k in keys]),
                         ("meta", ["{}"] * S), ("reason", ["" if v else "image_corrupt" for v in valid])):
        store.raw(name)[lo:lo + S] = np.array(values, dtype=object)
    write_marker(path, s, {"n_samples": S, "n_valid": int(valid.sum()),
                           "reasons": {"image_corrupt": int((~valid).sum())},
                           "splits": {"train": int((valid & (split == "train")).sum())}})
print(json.dumps({}))
"""

MEASURE_V1 = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from gap3d.pipeline.store import FeatureStore
from gap3d.trainer.data import StepBatchSampler, load_or_make_split
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
t0 = time.perf_counter()
store = FeatureStore.open(sys.argv[1])
t_open = time.perf_counter()
rows = store.indices(valid_only=True, committed_only=True, split="train")
heldout = store.indices(valid_only=True, committed_only=True, split="heldout")
t_index = time.perf_counter()
train, val, _ = load_or_make_split(Path(sys.argv[2]), rows, 0.05, 0, write=True)
t_split = time.perf_counter()
view = StepBatchSampler(train, 16, seed=0, rank=0, world_size=8)
first = view.batch(0)
t_view = time.perf_counter()
print(json.dumps({"samples": int(len(rows) + len(heldout)), "train": int(len(train)),
  "val": int(len(val)), "open_s": t_open - t0, "index_s": t_index - t_open,
  "split_s": t_split - t_index, "view_s": t_view - t_split, "total_s": t_view - t0,
  "rss_imports_mb": base, "rss_peak_mb": rss(), "rss_added_mb": rss() - base}))
"""


def bench_index(rows: int, old_rev: str | None) -> dict[str, Any]:
    n_shards = -(-rows // S)
    path = WORK / f"index-{n_shards}.zarr"
    out: dict[str, Any] = {"n_shards": n_shards, "samples_per_shard": S}
    if not (path / "zarr.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        print(f"index: building a {n_shards * S}-row paper-layout store at {path} ...", flush=True)
        out["build"] = _run_script(BUILD_V2, [str(path), str(n_shards), str(S), "1"])
    out["now"] = _run_script(MEASURE_V2, [str(path)])
    out["now"]["store_bytes_on_disk"] = _du(path)
    if old_rev:
        out["v0.1"] = _bench_old(old_rev, n_shards)
    return out


def _run_script(code: str, args: list[str], cwd: Path = ROOT, env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        out = subprocess.run(
            [sys.executable, f.name, *args],
            capture_output=True,
            text=True,
            timeout=7200,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _bench_old(rev: str, n_shards: int) -> dict[str, Any]:
    tree = WORK / f"gap3d-{rev[:8]}"
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
            check=True,
            capture_output=True,
        )
    path = WORK / f"index-v01-{n_shards}.zarr"
    env = {"PYTHONPATH": str(tree)}
    if not (path / "zarr.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        print(f"index: building the same store with gap3d {rev[:8]} at {path} ...", flush=True)
        _run_script(BUILD_V1, [str(path), str(n_shards), str(S)], cwd=tree, env=env)
    run_dir = Path(tempfile.mkdtemp(prefix="v01-run-"))
    try:
        res = _run_script(MEASURE_V1, [str(path), str(run_dir)], cwd=tree, env=env)
        res["split_file_bytes"] = (run_dir / "split.json").stat().st_size
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    res["rev"] = rev
    return res


# ------------------------------------------------------------------------------ 2. encode RSS
ENCODE_RSS = r"""
import io, json, resource, sys, tarfile, time
import numpy as np, torch
from PIL import Image
from gap3d.config import load_config
from gap3d.encoders.base import PromptBatch
from gap3d.layout import TokenLayout
from gap3d.pipeline import workers
from gap3d.pipeline.encode import store_spec
from gap3d.pipeline.sources import listed_sources
from gap3d.store import FeatureStore

S, tar_path, store_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = load_config("paper", [f"data.samples_per_shard={S}", "prompt_encoder.device=cpu",
                            "image_encoder.device=cpu", "prompt_encoder.dtype=float32",
                            "image_encoder.dtype=float32"])
LAY = TokenLayout(1, 4, 37, 37, 1024)

class StandInImage:
    # The real preprocessing size and output shape of DINOv2-L/14-reg at 518 px, no weights.
    layout = LAY
    cfg = cfg.image_encoder
    def preprocess(self, images):
        return torch.zeros(len(images), 3, 518, 518)
    def encode_pixels(self, pixels):
        return torch.randn(len(pixels), LAY.n_tokens, LAY.channels)
    def encode(self, images):
        return self.encode_pixels(self.preprocess(images))
    def info(self):
        return {"name": "dinov2_reg", "model": "stand-in"}

class StandInPrompt:
    max_length, hidden_size = 128, 2048
    def encode(self, captions, images=None, pad_to_max=True):
        n = len(captions)
        return PromptBatch(torch.randn(n, 128, 2048), torch.ones(n, 128, dtype=torch.bool))
    def info(self):
        return {"name": "qwen2_5_vl", "model": "stand-in"}

enc = workers.Encoders(StandInPrompt(), StandInImage())
workers._CACHE[workers.encoders_key(cfg.prompt_encoder, cfg.image_encoder)] = enc
info = {"prompt": enc.prompt.info(), "image": enc.image.info(), "layout": LAY.to_dict(),
        "prompt_dim": 2048, "prompt_max_length": 128}
src = listed_sources([tar_path])[0]
FeatureStore.create(store_path, store_spec(cfg, info, 1))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
limits = workers.EncodeLimits(cfg.data.max_image_pixels, cfg.data.max_caption_chars, cfg.data.max_member_bytes)
rep = workers.encode_shard(0, src, store_path, cfg.prompt_encoder, cfg.image_encoder, limits, 2)
print(json.dumps({"samples_per_shard": S, "n_samples": rep.n_samples, "seconds": time.perf_counter() - t0,
  "rss_before_mb": base, "peak_rss_mb": rep.peak_rss_bytes / 2**20,
  "image_batch": cfg.image_encoder.batch_size, "rows_per_file": FeatureStore.open(store_path).rows_per_file}))
"""


def _write_tar(path: Path, n: int) -> Path:
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (120, 30, 200)).save(buf, "JPEG")
    img = buf.getvalue()
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for ext, data in (("jpg", img), ("txt", f"a purple square {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def bench_encode_rss(sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    for n in sizes:
        tar = _write_tar(WORK / f"encode-{n}.tar", n)
        store = WORK / f"encode-{n}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        print(f"encode_rss: one paper-layout encode task, samples_per_shard={n} ...", flush=True)
        res = _run_script(ENCODE_RSS, [str(n), str(tar), str(store)])
        res["store_bytes"] = _du(store)
        out["runs"].append(res)
        shutil.rmtree(store, ignore_errors=True)
    peaks = [r["peak_rss_mb"] for r in out["runs"]]
    out["peak_ratio_largest_vs_smallest"] = peaks[-1] / peaks[0]
    return out


# ------------------------------------------------------------------------------- 3. re-run
RERUN = r"""
import json, sys, time
import psutil
from gap3d.config import load_config
from gap3d.pipeline.encode import cache
cfg = load_config("tiny", sys.argv[1:])
proc = psutil.Process()
io0, t0 = proc.io_counters(), time.perf_counter()
rep = cache(cfg)
io1, dt = proc.io_counters(), time.perf_counter() - t0
print(json.dumps({"seconds": dt, "skipped": len(rep.skipped), "encoded": len(rep.done),
  "read_chars": io1.read_chars - io0.read_chars, "read_bytes_disk": io1.read_bytes - io0.read_bytes,
  "read_calls": io1.read_count - io0.read_count}))
"""

BUILD_RERUN = r"""
import json, sys, io, tarfile
import numpy as np
from pathlib import Path
from gap3d.layout import TokenLayout
from gap3d.pipeline.sources import listed_sources
from gap3d.store import FeatureStore, StoreSpec, ShardData
root, n = Path(sys.argv[1]), int(sys.argv[2])
(root / "tars").mkdir(parents=True, exist_ok=True)
paths = []
for i in range(n):
    p = root / "tars" / f"{i:05d}.tar"
    with tarfile.open(p, "w") as tf:
        info = tarfile.TarInfo(f"{i:09d}.txt"); data = b"x"; info.size = 1
        tf.addfile(info, io.BytesIO(data))
    paths.append(str(p))
lay = TokenLayout(1, 4, 37, 37, 1024)
from gap3d.config import load_config
from gap3d.pipeline.encode import encoders_config_hash
extra = {"encoders_config": encoders_config_hash(load_config("tiny"))}  # what `cache` compares
spec = StoreSpec(layout=lay, prompt_dim=2048, prompt_max_length=128, n_shards=n,
                 samples_per_shard=1, encoding="int8", compression="none", extra=extra)
store = FeatureStore.create(root / "store.zarr", spec)
rng = np.random.default_rng(0)
for src in listed_sources(paths):
    d = ShardData(rng.standard_normal((1, lay.n_tokens, lay.channels), dtype=np.float32),
                  rng.standard_normal((1, 128, 2048), dtype=np.float32), np.ones((1, 128), bool),
                  ["c"], [f"k{src.shard_id}"], [""], ["train"], [{}], [""], np.zeros((1, 64, 64, 3), np.uint8))
    store.write_shard(src.shard_id, d, source=src.record())
print(json.dumps({}))
"""


def bench_rerun(n: int) -> dict[str, Any]:
    root = WORK / f"rerun-{n}"
    if not (root / "store.zarr" / "zarr.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"rerun: building a complete store of {n} shards ...", flush=True)
        _run_script(BUILD_RERUN, [str(root), str(n)])
    args = [
        f"workdir={root}",
        "data.source=shards",
        f"data.shards={root}/tars/{{00000..{n - 1:05d}}}.tar",
        "data.samples_per_shard=1",
        f"store.path={root / 'store.zarr'}",
        "store.encoding=int8",
    ]
    res = _run_script(RERUN, args)
    res["store_bytes_on_disk"] = _du(root / "store.zarr")
    res["n_shards"] = n
    return res


# ------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Scale benchmark",
        "",
        f"Generated by `benchmarks/scale.py` on {res['date']} ({res['machine']}; load average "
        f"{res['load_before']} before the run). Each figure is measured in a fresh process.",
        "",
    ]
    if "index" in res:
        ix = res["index"]
        now, old = ix["now"], ix.get("v0.1")
        lines += [
            f"## Open + index + split + rank view ({now['rows']:,} rows, {ix['n_shards']} shards "
            "of 1024, paper layout)",
            "",
            "| | this version | v0.1 |",
            "|---|---:|---:|",
        ]
        for key, label in (
            ("open_s", "open (s)"),
            ("index_s", "index (s)"),
            ("split_s", "train/val split (s)"),
            ("view_s", "rank 0 of 8: epoch order + first batch (s)"),
            ("total_s", "**total (s)**"),
            ("rss_added_mb", "**RSS added by the work (MB)**"),
            ("rss_imports_mb", "RSS after imports (MB)"),
        ):
            o = f"{old[key]:.2f}" if old and key in old else "-"
            lines.append(f"| {label} | {now[key]:.2f} | {o} |")
        if old:
            lines.append(f"| validation rows withheld | {now['val']} | {old['val']:,} |")
            lines.append(
                f"| split file | a threshold (bytes: ~100) | {old['split_file_bytes'] / 1e6:.1f} MB of row ids |"
            )
        lines += ["", "Targets: <= 2 s and <= 300 MB for the work (imports excluded).", ""]
    if "encode_rss" in res:
        er = res["encode_rss"]
        lines += [
            "## Encode task peak RSS (paper layout, stand-in encoders of the real output shapes)",
            "",
            "| samples_per_shard | samples | seconds | peak RSS (MB) | rows per file |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in er["runs"]:
            lines.append(
                f"| {r['samples_per_shard']} | {r['n_samples']} | {r['seconds']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {r['rows_per_file']} |"
            )
        lines += [
            "",
            f"Peak ratio largest/smallest shard: **{er['peak_ratio_largest_vs_smallest']:.2f}** "
            "(target <= 1.2).",
            "",
        ]
    if "rerun" in res:
        rr = res["rerun"]
        lines += [
            "## `gap3d cache` over a complete store",
            "",
            f"{rr['n_shards']} shards, {rr['store_bytes_on_disk'] / 1e9:.2f} GB on disk: "
            f"**{rr['seconds']:.2f} s**, {rr['read_chars'] / 1e6:.1f} MB read by the process "
            f"({rr['read_calls']} read calls), {rr['skipped']} skipped, {rr['encoded']} encoded.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--old-rev", default="4196da4", help="v0.1 commit to compare with ('' = skip)")
    ap.add_argument("--encode-sizes", default="256,2048")
    ap.add_argument("--rerun-shards", type=int, default=1000)
    ap.add_argument("--only", choices=["index", "encode_rss", "rerun"], action="append")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "load_before": round(os.getloadavg()[0], 2),
    }
    only = set(args.only or ["index", "encode_rss", "rerun"])
    if "index" in only:
        res["index"] = bench_index(args.rows, args.old_rev or None)
    if "encode_rss" in only:
        res["encode_rss"] = bench_encode_rss([int(x) for x in args.encode_sizes.split(",")])
    if "rerun" in only:
        res["rerun"] = bench_rerun(args.rerun_shards)
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "scale.json"
    if args.only and previous.exists():  # a partial run keeps the other sections' results
        res = {**json.loads(previous.read_text()), **res}
    (RESULTS / "scale.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (RESULTS / "scale.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
