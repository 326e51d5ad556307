"""``gap3d plan``: render a plan as text (terminal), markdown and JSON, and the CLI entry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gap3d.config import Gap3dConfig

_SRC = {"measured": "measured", "published": "published", "analytic": "analytic"}


def fmt_bytes(b: float | None) -> str:
    if b is None or b != b:
        return "-"
    for unit, k in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= k:
            return f"{b / k:.3g} {unit}" if b / k < 100 else f"{b / k:.0f} {unit}"
    return f"{b:.0f} B"


def fmt_s(s: float | None) -> str:
    if s is None or s != s:
        return "-"
    if s >= 86400 * 2:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.1f} s"
    return f"{s * 1e3:.1f} ms"


def fmt_h(h: float) -> str:
    return f"{h:,.1f}" if h >= 1 else f"{h:.3f}"


def _fig(f: dict[str, Any], fmt: Any = fmt_s) -> str:
    return f"{fmt(f['value'])}  [{f['source']}{': ' + f['note'] if f.get('note') else ''}]"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def format_text(plan: dict[str, Any]) -> str:
    t = plan["target"]
    spec = t.get("spec")
    dev = f"{plan['gpus']} x {t['name']}" if t["kind"] == "cuda" else f"{t['name']} (CPU)"
    where = f"published: {spec['source']}" if spec else "measured by gap3d bench"
    cal = plan["calibration"]
    lines = [
        f"gap3d plan: config '{plan['config']}', {plan['pairs']:,} pairs, {dev} ({where})",
        "calibration: "
        + (
            f"{cal['path']} ({cal['device']}{', paper shapes' if cal['paper_shapes'] else ''}, "
            f"{cal['created_utc']})"
            if cal["path"]
            else "none (figures are analytic or published; run `gap3d bench` to measure)"
        ),
    ]
    for n in plan["notes"]:
        lines.append(f"note: {n}")

    st = plan["storage"]
    combos = list(st["combos"])
    conf = st["configured"]
    lines += ["", f"STORAGE per sample (total for {plan['pairs']:,} pairs); * = configured"]
    rows = []
    for g in st["combos"][conf]["groups"]:
        row = [g]
        for c in combos:
            x = st["combos"][c]["groups"][g]
            row.append(f"{fmt_bytes(x['bytes_per_sample'])} ({fmt_bytes(x['total_bytes'])})")
        row.append(st["combos"][conf]["groups"][g]["source"])
        rows.append(row)
    rows.append(
        ["store total"]
        + [
            f"{fmt_bytes(st['combos'][c]['bytes_per_sample'])} ({fmt_bytes(st['combos'][c]['total_bytes'])})"
            for c in combos
        ]
        + [""]
    )
    header = ["", *[c + ("*" if c == conf else "") for c in combos], "source"]
    lines += ["  " + r for r in _table(rows, header)]
    sh = st["source_shards"]
    lines.append(
        f"  downloaded webdataset shards (outside the store): {fmt_bytes(sh['bytes_per_sample'])}"
        f"/sample, {fmt_bytes(sh['total_bytes'])}  [{sh['source']}: {sh['note']}]"
    )

    e = plan["encode"]
    lines += ["", f"ENCODE (frozen encoders, {e['workers']} worker(s))"]
    lines.append(f"  per sample      {_fig(e['s_per_sample'])}")
    for k, v in e["parts"].items():
        lines.append(f"    {k:<13} {_fig(v)}")
    lines.append(f"  start-up        {_fig(e['startup_s'])}")
    lines.append(f"  encode tasks    {fmt_s(e['tasks_s'])} (busiest worker)")
    lines.append(f"  statistics      {_fig(e['finalize_s'])}")
    unit = "GPU-hours" if t["kind"] == "cuda" else "worker-hours"
    lines.append(f"  wall time       {fmt_s(e['wall_s'])}   ->  {fmt_h(e['device_hours'])} {unit}")
    if e.get("cpu_s"):
        lines.append(f"  CPU time        {_fig(e['cpu_s'])}")
    m = e["memory"]
    lines.append(f"  device memory   {_fig(m['device_peak'], fmt_bytes)}")
    lines.append(f"  host memory     {_fig(m['host_peak'], fmt_bytes)}")

    tr = plan["train"]
    mem = plan["memory"]
    conf_mem = mem["configured"]
    lines += [
        "",
        f"TRAINING ({conf_mem['params'] / 1e6:.1f} M aligner parameters, batch "
        f"{conf_mem['batch']} per device x {tr['devices']} device(s))",
        f"  steps           {tr['steps']:,} (global batch {tr['global_batch']} = "
        f"{tr['epochs']:.2f} epochs)",
        f"  per step        {_fig(tr['step_s'])}",
        f"  steps total     {fmt_s(tr['steps_s'])}",
        f"  validation      {_fig(tr['validation_s'])}",
        f"  checkpoints     {_fig(tr['checkpoint_s'])}  ({fmt_bytes(tr['checkpoint_bytes'])} each)",
        f"  start-up        {_fig(tr['startup_s'])}",
        f"  wall time       {fmt_s(tr['wall_s'])}   ->  {fmt_h(tr['device_hours'])} {unit}",
    ]
    if tr.get("cpu_s"):
        lines.append(f"  CPU time        {_fig(tr['cpu_s'])}")
    lines += ["", "MEMORY per training device (traced parts; peak as stated)"]
    a, b = mem["without_ckpt"], mem["with_ckpt"]
    rows = [
        [name, fmt_bytes(a["parts"][k]), fmt_bytes(b["parts"][k])]
        for name, k in (
            ("weights", "weights"),
            ("gradients", "gradients"),
            ("optimizer (AdamW)", "optimizer"),
            ("EMA", "ema"),
            ("activations (saved)", "activations"),
        )
    ]
    rows.append(["traced peak", fmt_bytes(a["traced_peak"]), fmt_bytes(b["traced_peak"])])
    rows.append(["peak", fmt_bytes(a["peak"]["value"]), fmt_bytes(b["peak"]["value"])])
    rows.append(
        [
            f"fits {fmt_bytes(a['device_memory'])}?",
            "yes" if a["fits"] else "NO",
            "yes" if b["fits"] else "NO",
        ]
    )
    lines += ["  " + r for r in _table(rows, ["", "no checkpointing", "gradient checkpointing"])]
    lines.append(f"  peak: {a['peak']['source']}: {a['peak']['note']}")

    ps = plan.get("paper_shapes")
    if ps:
        lines += [
            "",
            f"PAPER SHAPES (measured on {ps['device']} with random-weight models of the real "
            "architectures)",
            "  bytes/sample on disk: "
            + ", ".join(
                f"{c}{'*' if c == ps['configured'] else ''} {fmt_bytes(b)}"
                for c, b in ps["bytes_per_sample"].items()
            ),
            f"  encode worker peak memory {fmt_bytes(ps['encode_worker_peak_rss'])} (prompt batch "
            f"{ps['encode_batch_sizes']['prompt']}, image batch {ps['encode_batch_sizes']['image']})",
        ]
        rows = []
        for p in ps["aligner_probes"]:
            label = (
                f"{p['preset']} b{p['batch']}{' ckpt' if p['grad_ckpt'] else ''} {p['precision']}"
            )
            if "measured_peak" in p:
                rows.append(
                    [
                        label,
                        f"{p['params'] / 1e6:.0f} M",
                        fmt_bytes(p["measured_peak"]),
                        fmt_bytes(p["traced_peak"]),
                        f"{p['measured_peak'] / p['traced_peak']:.2f}",
                        fmt_s(p["step_s"]),
                    ]
                )
            else:
                rows.append(
                    [
                        label,
                        f"{p['params'] / 1e6:.0f} M",
                        "-",
                        fmt_bytes(p["traced_peak"]),
                        "-",
                        p["skipped"],
                    ]
                )
        lines += [
            "  " + r
            for r in _table(
                rows, ["aligner step", "params", "measured", "traced", "ratio", "s/step"]
            )
        ]
    if plan.get("knobs"):
        lines += ["", "KNOBS (one change at a time)"]
        rows = []
        for k in plan["knobs"]:
            if "error" in k:
                rows.append([k["change"], "-", "-", "-", "-", "-", k["error"][:60]])
                continue
            rows.append(
                [
                    k["change"],
                    fmt_bytes(k["store_bytes"]),
                    fmt_h(k["encode_device_hours"]),
                    fmt_bytes(k["encode_host_peak"]),
                    fmt_h(k["train_device_hours"]),
                    fmt_bytes(k["train_peak"]),
                    "yes" if k["fits"] else "NO",
                ]
            )
        hdr = [
            "change",
            "store",
            f"encode {unit}",
            "encode host RAM",
            f"train {unit}",
            "train peak/device",
            "fits",
        ]
        lines += ["  " + r for r in _table(rows, hdr)]
    if plan["warnings"]:
        lines += ["", "WARNINGS"] + [f"  ! {w}" for w in plan["warnings"]]
    lines += [
        "",
        "SOURCES (measured: gap3d bench on the device; published: vendor datasheet; "
        "analytic: counted or assumed, as noted)",
    ]
    lines += [f"  {k:<24} {v}" for k, v in plan["sources"].items()]
    a_ = plan["assumptions"]
    lines.append(
        f"  assumed utilisation where not measured: training {a_['mfu_train']:.0%}, "
        f"inference {a_['mfu_infer']:.0%} of peak (--mfu-train / --mfu-infer)"
    )
    return "\n".join(lines)


def format_markdown(plan: dict[str, Any]) -> str:
    """The same report as markdown (a fenced block keeps the tables aligned)."""
    return f"# gap3d plan: {plan['config']}, {plan['pairs']:,} pairs\n\n```\n{format_text(plan)}\n```\n"


def write_outputs(plan: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, md = out_dir / "plan.json", out_dir / "plan.md"
    j.write_text(json.dumps(plan, indent=1, default=str))
    md.write_text(format_markdown(plan))
    return j, md


def other_machine(cal: dict[str, Any]) -> str | None:
    """A sentence if ``cal`` was measured on a machine unlike this one, else None."""
    from gap3d.plan.hardware import describe_machine

    here, there = describe_machine(), cal.get("machine", {})
    keys = ("cpu_model", "cores")
    same = all(here.get(k) == there.get(k) for k in keys) and [
        d["name"] for d in here["cuda_devices"]
    ] == [d.get("name") for d in there.get("cuda_devices", [])]
    if same:
        return None
    return (
        f"{cal['path']} was measured on another machine ({there.get('cpu_model')}, "
        f"{there.get('cores')} cores, GPUs: "
        f"{', '.join(d.get('name', '?') for d in there.get('cuda_devices', [])) or 'none'}); "
        "its figures describe that machine. Run `gap3d bench` here for this one."
    )


def find_calibration(cfg: Gap3dConfig, path: str | None) -> dict[str, Any] | None:
    from gap3d.plan import calibration

    if path:
        return calibration.load(path)
    for p in (
        calibration.default_path(cfg),
        calibration.default_path(cfg).with_name("calibration-paper-shapes.json"),
    ):
        if p.is_file():
            return calibration.load(p)
    return None


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d plan``."""
    from gap3d.plan.plan import make_plan

    cal = find_calibration(cfg, getattr(args, "calibration", None))
    if cal is not None and cal.get("config_hash") != cfg.hash():
        print(
            f"gap3d plan: note: {cal['path']} was measured for config '{cal.get('config')}' "
            "with other settings; what differs is scaled analytically",
            file=sys.stderr,
        )
    other = other_machine(cal) if cal is not None else None

    def progress(msg: str) -> None:
        print(f"[plan] {msg} ...", file=sys.stderr, flush=True)

    disk = getattr(args, "disk", None)
    plan = make_plan(
        cfg,
        args.pairs,
        args.gpus,
        calibration=cal,
        gpu=args.gpu,
        epochs=args.epochs,
        grad_ckpt=bool(args.grad_ckpt),
        disk_bytes=disk * 1e12 if disk else None,
        mfu_train=args.mfu_train,
        mfu_infer=args.mfu_infer,
        knobs=not args.no_knobs,
        progress=progress,
    )
    if other:
        plan["notes"].insert(0, other)
    out = Path(args.out) if args.out else cfg.work / "plan"
    j, md = write_outputs(plan, out)
    if args.json:
        print(json.dumps(plan, indent=1, default=str))
    else:
        print(format_text(plan))
        print(f"\nwrote {j} and {md}")
    return 0
