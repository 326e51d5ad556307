"""A plan next to the real run it predicts (any preset; the README's demo figures come from it).

    .venv/bin/python benchmarks/plan_check.py --config demo [key=value ...]
    .venv/bin/python benchmarks/plan_check.py --config tiny --samples 384 train.max_steps=240

1. ``gap3d bench`` on this machine (calibration under ``<workdir>/plan-check/``), on the first
   samples of the same shards;
2. ``gap3d plan`` for exactly the samples of the real run;
3. the real run: the cache stage on the config's downloaded shards (``gap3d download`` output
   in ``<workdir>/shards``; synthetic shards in img2dataset's layout with ``--samples`` or when
   there are none) into a fresh store, then ``gap3d train`` in a fresh process;
4. plan vs real: storage, encode and train wall time, peak memory, against issue 11's targets.

Writes ``benchmarks/results/plan-check-<config>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gap3d.config import load_config  # noqa: E402
from gap3d.plan import calibration  # noqa: E402
from gap3d.plan.bench import run_bench  # noqa: E402
from gap3d.plan.plan import make_plan  # noqa: E402
from gap3d.plan.report import format_text  # noqa: E402
from gap3d.plan.validate import compare, format_rows, real_cache, real_train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def count_samples(shards: list[Path]) -> int:
    keys = set()
    for p in shards:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    keys.add((str(p), m.name.rsplit("/", 1)[-1].split(".", 1)[0]))
    return len(keys)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--samples", type=int, help="synthetic samples instead of downloaded shards")
    ap.add_argument("--threads", type=int, help="torch threads of the probes")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    user = load_config(args.config, args.overrides)
    work = user.work / "plan-check"
    shutil.rmtree(work, ignore_errors=True)
    overrides = [*args.overrides, f"workdir={work / 'real'}"]
    cfg = load_config(args.config, overrides)

    from gap3d.pipeline.download import list_shards
    from gap3d.plan.synthetic import write_synthetic_shards

    shards = [] if args.samples else list_shards(user.shards_dir)
    if shards:
        n, source = count_samples(shards), f"downloaded shards in {user.shards_dir}"
    else:
        n = args.samples or 512
        shards = write_synthetic_shards(
            work / "shards", n, cfg.data.samples_per_shard, cfg.data.download_image_size, seed=1
        )
        source = "synthetic shards"
    print(f"plan-check {args.config}: {n} samples ({source})", flush=True)

    t0 = time.perf_counter()
    cal_path = work / "calibration.json"
    # the bench samples the same data the run encodes (its first shards), as a user would
    run_bench(cfg, cal_path, threads=args.threads, sources=shards)
    bench_s = time.perf_counter() - t0
    plan = make_plan(cfg, n, calibration=calibration.load(cal_path), knobs=False)
    text = format_text(plan)
    print(text, flush=True)

    cache = real_cache(cfg, shards)
    train = real_train(args.config, overrides, log=work / "train.log")
    rows = compare(plan, cache, train)
    table = format_rows(rows)
    print("\n" + table)

    RESULTS.mkdir(exist_ok=True)
    name = f"plan-check-{args.config}"
    payload = {
        "config": args.config,
        "overrides": args.overrides,
        "samples": n,
        "shards": source,
        "bench_s": bench_s,
        "machine": plan["calibration"]["device"],
        "rows": rows,
        "real": {"cache": cache, "train": train},
        "plan": plan,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(
        f"# Plan vs real run: {args.config} ({n} samples, {source})\n\n"
        f"Measured on {plan['calibration']['device']}; bench {bench_s:.0f} s before the run.\n\n"
        f"```\n{table}\n```\n\nThe plan:\n\n```\n{text}\n```\n"
    )
    print(f"wrote {RESULTS / name}.json and .md")
    return 0 if all(r["ok"] for r in rows if r["asserted"]) else 1


if __name__ == "__main__":
    sys.exit(main())
