"""Generation benchmark on the demo preset: latency per stage and batch throughput.

Run: ``.venv/bin/python benchmarks/generate.py`` (a few minutes on 2 CPU cores). Writes
``benchmarks/results/generate.json`` and prints a table.

* Prompt encoder: the demo's real all-MiniLM-L6-v2 (``configs/demo.yaml``).
* Aligner: the trained export at ``work/demo/train/export`` if it exists; otherwise a randomly
  initialised aligner of the demo size (``small`` preset, EfficientNet-Lite0 layout 1 + 7x7 x
  1280) — the JSON says which. Sampling cost does not depend on the weights' values.
* Generator: retrieval over the demo asset library (``work/demo/assets`` if present, else a
  smaller library built with ``gap3d demo-data`` settings into a temporary folder — the JSON
  records its size; retrieval cost grows linearly with the number of renders).

Latency of one prompt is split into prompt encoding, sampling (per Euler step, CFG 3 = one
2B-batch forward per step) and the generator; throughput covers encode + sample at batch
1 / 8 / 32 (prompts per second; sampling timed over a few Euler steps and scaled to the full
count, as every step does the same work), plus retrieval scoring alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import torch  # noqa: E402

from gap3d.config import load_config  # noqa: E402
from gap3d.inference.generate import GenerateSession  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a red cube",
    "a small blue sphere",
    "a green torus seen from above",
    "a yellow cone",
    "a purple cylinder lying on its side",
    "a white capsule",
    "an orange pyramid",
    "a black prism",
]


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_export(cfg: Any, out_dir: Path) -> Path:
    """A randomly initialised demo-size aligner with a manifest from the real demo encoders."""
    from gap3d.encoders import build_image_encoder, build_prompt_encoder
    from gap3d.trainer.export import save_export
    from gap3d.trainer.model import AlignerNet
    from gap3d.trainer.normalize import TokenNormalizer

    pe, ie = build_prompt_encoder(cfg.prompt_encoder), build_image_encoder(cfg.image_encoder)
    manifest = {
        "layout": ie.layout.to_dict(),
        "prompt_encoder": pe.info(),
        "image_encoder": ie.info(),
        "prompt_template": cfg.prompt_encoder.template,
        "prompt_dim": pe.hidden_size,
        "prompt_max_length": cfg.prompt_encoder.max_length,
    }
    torch.manual_seed(0)
    net = AlignerNet(ie.layout, pe.hidden_size, cfg.aligner)
    return save_export(
        out_dir,
        net,
        TokenNormalizer(ie.layout, None),
        aligner_cfg=cfg.aligner,
        layout=ie.layout,
        prompt_dim=pe.hidden_size,
        prompt_max_length=cfg.prompt_encoder.max_length,
        manifest=manifest,
        extra={"note": "random init (benchmark)"},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="Euler steps (demo: sample.steps)")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--throughput-steps",
        type=int,
        default=3,
        help="Euler steps timed per batch size (scaled to --steps)",
    )
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # the machine is shared: record how busy it was
    tmp = Path(tempfile.mkdtemp(prefix="gap3d_bench_generate_"))

    cfg = load_config("demo", [f"workdir={ROOT / 'work' / 'demo'}", f"sample.steps={args.steps}"])
    trained = (cfg.export_dir / "aligner.json").exists()
    aligner_dir = cfg.export_dir if trained else random_export(cfg, tmp / "export")
    if not (cfg.assets_dir / "library.json").exists():
        from gap3d.pipeline.demo_data import build_demo_library

        small = load_config(
            "demo", [f"workdir={tmp}", "data.demo.variants_per_combo=1", "data.demo.views=2"]
        )
        build_demo_library(small)
        cfg.generator.library = str(small.assets_dir)
    session = GenerateSession(cfg, aligner_dir, device="cpu")
    t0 = time.perf_counter()
    session.load()  # aligner, encoder, and the library index (encoded once, then cached)
    load_s = time.perf_counter() - t0
    index = session.generator.index

    # --- latency of one prompt, per stage ------------------------------------------------
    r = args.repeats
    session.run(PROMPTS[0], out_dir=tmp / "warmup")
    batch = session.encode([PROMPTS[0]])
    enc = _median_time(lambda: session.encode([PROMPTS[0]]), r)
    samp = _median_time(lambda: session.sample(batch.hidden, batch.mask), r)
    tokens = session.sample(batch.hidden, batch.mask)
    gen = _median_time(lambda: session.generator.generate(tokens, tmp / "gen", PROMPTS[0]), r)
    end_to_end = _median_time(lambda: session.run(PROMPTS[0], out_dir=tmp / "e2e"), r)

    # --- throughput at several batch sizes ------------------------------------------------
    # Every Euler step costs the same (one guided forward of 2B sequences), so the sampling
    # time of a batch is measured over ``--throughput-steps`` steps and scaled to ``--steps``.
    ts = args.throughput_steps
    throughput = {}
    for b in args.batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        pb = session.encode(prompts)
        t_enc = _median_time(lambda p=prompts: session.encode(p), r)
        t_step = _median_time(lambda pb=pb: session.sample(pb.hidden, pb.mask, steps=ts), r) / ts
        toks = session.sample(pb.hidden, pb.mask, steps=ts)
        t_rank = _median_time(lambda t=toks: session.generator.rank(t), r)
        t_smp = t_step * args.steps
        throughput[str(b)] = {
            "encode_s": t_enc,
            "sample_per_step_s": t_step,
            "sample_s": t_smp,
            "retrieval_rank_s": t_rank,
            "prompts_per_s_encode_sample": b / (t_enc + t_smp),
            "prompts_per_s_with_retrieval": b / (t_enc + t_smp + t_rank),
        }
        print(f"batch {b}: {throughput[str(b)]}", flush=True)

    n_params = sum(p.numel() for p in session.aligner.net.parameters())
    result = {
        "preset": "demo",
        "aligner": "trained export" if trained else "random init (no trained demo export found)",
        "aligner_params": n_params,
        "aligner_size": session.aligner.config["aligner"],
        "layout": session.aligner.layout.to_dict(),
        "prompt_encoder": cfg.prompt_encoder.model,
        "steps": args.steps,
        "throughput_steps_measured": args.throughput_steps,
        "cfg_scale": cfg.sample.cfg_scale,
        "library": {
            "assets": len(index.assets),
            "renders": int(index.tokens.shape[0]),
            "path": str(cfg.assets_dir),
        },
        "load_s": load_s,
        "latency_batch1_s": {
            "encode": enc,
            "sample": samp,
            "sample_per_step": samp / args.steps,
            "generator": gen,
            "end_to_end": end_to_end,
        },
        "throughput": throughput,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device": "cpu",
            "loadavg_1_5_15min_start": [round(x, 2) for x in load_before],
            "loadavg_1_5_15min_end": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine; other jobs may have been running (see loadavg)",
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    lat = result["latency_batch1_s"]
    print(
        f"\ngap3d generate benchmark (demo preset, {result['aligner']}, "
        f"{n_params / 1e6:.1f} M params, {args.steps} steps, CFG {cfg.sample.cfg_scale}, "
        f"library {len(index.assets)} assets / {index.tokens.shape[0]} renders, CPU x "
        f"{torch.get_num_threads()} threads)"
    )
    print("latency of one prompt (median):")
    for k in ("encode", "sample", "sample_per_step", "generator", "end_to_end"):
        print(f"  {k:<16} {lat[k] * 1000:10.1f} ms")
    print(
        f"{'batch':>6} {'encode s':>10} {'sample s':>10} {'ms/step':>9} {'rank s':>9} "
        f"{'prompts/s':>10} {'+retrieval':>11}"
    )
    for b, t in throughput.items():
        print(
            f"{b:>6} {t['encode_s']:>10.3f} {t['sample_s']:>10.3f} "
            f"{t['sample_per_step_s'] * 1000:>9.1f} {t['retrieval_rank_s']:>9.3f} "
            f"{t['prompts_per_s_encode_sample']:>10.2f} {t['prompts_per_s_with_retrieval']:>11.2f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
