"""``gap3d plan``'s assembly: which device, the estimates, the knobs, the warnings.

:func:`make_plan` returns one JSON-able dict; ``gap3d/plan/report.py`` renders it.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from gap3d.config import Gap3dConfig, config_from_dict
from gap3d.plan import calibration as calib
from gap3d.plan.estimate import ANALYTIC, MEASURED, PUBLISHED, PlanInputs, Planner, Target
from gap3d.plan.hardware import DEFAULT_GPU, match_device_name, published_device


class PlanError(ValueError):
    """A plan that cannot be made as asked; the message says what to do."""


def wants_gpu(cfg: Gap3dConfig) -> bool:
    """Does the config run its stages on CUDA devices?"""
    return (
        cfg.image_encoder.device.startswith("cuda")
        or cfg.prompt_encoder.device.startswith("cuda")
        or cfg.train.accelerator in ("gpu", "cuda")
    )


def resolve_target(
    cfg: Gap3dConfig, cal: dict[str, Any] | None, gpu: str | None, notes: list[str]
) -> Target:
    """The device to plan for: a named GPU (published figures), the calibration's device
    (measured), this machine's GPU, or - for a GPU config with nothing else - the default."""
    dev = (cal or {}).get("device", {})
    cal_spec = match_device_name(dev.get("name", "")) if dev.get("kind") == "cuda" else None
    if gpu:
        spec = published_device(gpu)
        measured = cal_spec is not None and cal_spec.name == spec.name
        if cal and not measured:
            notes.append(
                f"the calibration was made on {calib.device_label(cal)}, not {spec.name}: its "
                "device timings are not used; sizes and host-side figures are"
            )
        return Target("cuda", spec.name, spec.memory_bytes, PUBLISHED, spec, measured)
    if cal and (dev.get("kind") == "cuda" or not wants_gpu(cfg)):
        kind = dev.get("kind", "cpu")
        return Target(
            kind,
            dev.get("name", "?"),
            float(dev.get("memory_bytes") or 0),
            MEASURED,
            cal_spec,
            True,
        )
    if wants_gpu(cfg):
        if torch.cuda.is_available():
            spec = match_device_name(torch.cuda.get_device_name(0))
            if spec is not None:
                notes.append(f"planning for this machine's GPU ({spec.name}, published figures)")
                return Target("cuda", spec.name, spec.memory_bytes, PUBLISHED, spec, False)
        spec = published_device(DEFAULT_GPU)
        notes.append(
            f"no --gpu given{' and the calibration is from a CPU' if cal else ''}: planning for "
            f"{spec.name} (published figures); name yours with --gpu"
        )
        return Target("cuda", spec.name, spec.memory_bytes, PUBLISHED, spec, False)
    raise PlanError(
        f"config '{cfg.name}' runs on the CPU and there is no calibration for it: run "
        f"`gap3d bench --config {cfg.name}` first (writes {calib.default_path(cfg)}), or plan "
        "for a GPU with --gpu NAME"
    )


def _variant(cfg: Gap3dConfig, overrides: dict[str, Any]) -> Gap3dConfig:
    d = copy.deepcopy(cfg.to_dict())
    for key, value in overrides.items():
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return config_from_dict(d, source=f"{cfg.source} + {overrides}")


def knob_list(cfg: Gap3dConfig, grad_ckpt: bool) -> list[tuple[str, dict[str, Any], bool]]:
    """``(label, config overrides, gradient checkpointing)`` of the alternatives shown."""
    out: list[tuple[str, dict[str, Any], bool]] = []
    other_enc = "int8" if cfg.store.encoding == "float16" else "float16"
    out.append((f"store.encoding={other_enc}", {"store.encoding": other_enc}, grad_ckpt))
    other_comp = "zstd" if cfg.store.compression == "none" else "none"
    out.append((f"store.compression={other_comp}", {"store.compression": other_comp}, grad_ckpt))
    L = cfg.prompt_encoder.max_length
    if L >= 16:
        out.append(
            (
                f"prompt_encoder.max_length={L // 2}",
                {"prompt_encoder.max_length": L // 2},
                grad_ckpt,
            )
        )
    a = cfg.aligner
    overridden = any(getattr(a, k) is not None for k in ("width", "depth", "heads", "mlp_ratio"))
    for preset in ("small", "base", "paper"):
        if preset == a.preset and not overridden:
            continue
        o = {
            "aligner.preset": preset,
            "aligner.width": None,
            "aligner.depth": None,
            "aligner.heads": None,
            "aligner.mlp_ratio": None,
        }
        out.append((f"aligner.preset={preset}", o, grad_ckpt))
    B = cfg.train.batch_size
    out.append((f"train.batch_size={2 * B}", {"train.batch_size": 2 * B}, grad_ckpt))
    if B > 1:
        out.append((f"train.batch_size={B // 2}", {"train.batch_size": B // 2}, grad_ckpt))
    out.append((f"gradient checkpointing {'off' if grad_ckpt else 'on'}", {}, not grad_ckpt))
    S = cfg.data.samples_per_shard
    if S >= 16:
        out.append(
            (f"data.samples_per_shard={S // 4}", {"data.samples_per_shard": S // 4}, grad_ckpt)
        )
    return out


def _disk_free(path: Path) -> float | None:
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return float(shutil.disk_usage(p).free)
    except OSError:
        return None


def _parse_bytes(text: str) -> float | None:
    try:
        from dask.utils import parse_bytes

        return float(parse_bytes(text))
    except Exception:  # noqa: BLE001
        return None


def make_plan(
    cfg: Gap3dConfig,
    pairs: int,
    gpus: int | None = None,
    *,
    calibration: dict[str, Any] | None = None,
    gpu: str | None = None,
    epochs: float | None = None,
    grad_ckpt: bool = False,
    disk_bytes: float | None = None,
    mfu_train: float | None = None,
    mfu_infer: float | None = None,
    knobs: bool = True,
    progress: Any = None,
) -> dict[str, Any]:
    """The whole plan for ``pairs`` image-text pairs as a JSON-able dict."""
    if pairs < 1:
        raise PlanError(f"--pairs must be >= 1, got {pairs}")
    if gpus is not None and gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if epochs is not None and epochs <= 0:
        raise PlanError(f"--epochs must be > 0, got {epochs}")
    notes: list[str] = []
    target = resolve_target(cfg, calibration, gpu, notes)
    k = gpus or (cfg.train.devices if target.kind == "cuda" else 1)
    inp = PlanInputs(
        cfg,
        pairs,
        k,
        target,
        calibration,
        epochs,
        mfu_train or 0.0,
        mfu_infer or 0.0,
        grad_ckpt,
        notes,
    )
    from gap3d.plan.figures import MFU_INFER, MFU_TRAIN

    inp.mfu_train = mfu_train or MFU_TRAIN
    inp.mfu_infer = mfu_infer or MFU_INFER
    say = progress or (lambda msg: None)
    planner = Planner(inp)
    say("storage")
    storage = planner.storage()
    say("encode")
    encode = planner.encode()
    say("training (tracing the aligner)")
    train = planner.train()
    memory = {
        "configured": planner.memory(),
        "without_ckpt": planner.memory(grad_ckpt=False),
        "with_ckpt": planner.memory(grad_ckpt=True),
    }
    plan: dict[str, Any] = {
        "config": cfg.name,
        "config_source": cfg.source,
        "pairs": pairs,
        "gpus": k,
        "target": target.to_dict(),
        "calibration": {
            "path": (calibration or {}).get("path"),
            "device": calib.device_label(calibration) if calibration else None,
            "created_utc": (calibration or {}).get("created_utc"),
            "paper_shapes": bool((calibration or {}).get("paper_shapes")),
        },
        "assumptions": {
            "mfu_train": inp.mfu_train,
            "mfu_infer": inp.mfu_infer,
            "grad_ckpt": grad_ckpt,
            "epochs": epochs,
        },
        "storage": storage,
        "encode": encode,
        "train": train,
        "memory": memory,
        "notes": notes,
    }
    if calibration and calibration.get("paper_shapes"):
        plan["paper_shapes"] = paper_shapes_summary(calibration)
    if knobs:
        say("knobs")
        plan["knobs"] = _knobs(cfg, inp, planner, grad_ckpt)
    plan["warnings"] = _warnings(cfg, plan, disk_bytes)
    plan["sources"] = _sources(plan)
    return plan


def paper_shapes_summary(cal: dict[str, Any]) -> dict[str, Any]:
    """What a ``--paper-shapes`` calibration measured at the paper's true tensor sizes."""
    enc = cal.get("encode", {})
    st = cal.get("store", {})
    probes = []
    for p in cal.get("train", {}).get("step_probes", []):
        m = p.get("measured")
        row = {
            "preset": p["aligner"]["preset"],
            "batch": p["batch"],
            "grad_ckpt": p["grad_ckpt"],
            "precision": p["precision"],
            "traced_peak": p["traced"]["peak"],
            "params": p["traced"]["params"],
        }
        if m:
            # resident memory the step added to the process (tensors + malloc overhead)
            row["measured_peak"] = m.get("cuda_peak_allocated") or (m["peak_rss"] - m["rss_start"])
            row["step_s"] = m["step_s"]
        else:
            row["skipped"] = p.get("skipped") or p.get("error", "")[:120]
        probes.append(row)
    combo = cal.get("bench_config", {}).get("store", {})
    key = f"{combo.get('encoding', 'float16')}/{combo.get('compression', 'none')}"
    return {
        "device": calib.device_label(cal),
        "bytes_per_sample": {c: sum(v.values()) for c, v in st.get("on_disk", {}).items()},
        "configured": key,
        "encode_worker_peak_rss": enc.get("worker_peak_rss"),
        "encode_batch_sizes": {
            r: enc.get(f"{r}_encoder", {}).get("batch_size") for r in ("prompt", "image")
        },
        "encode_samples": enc.get("samples"),
        "aligner_probes": probes,
    }


def _summary(planner: Planner) -> dict[str, Any]:
    st = planner.storage()
    enc = planner.encode()
    tr = planner.train()
    mem = planner.memory()
    return {
        "store_bytes": st["store_bytes"],
        "encode_device_hours": enc["device_hours"],
        "encode_host_peak": enc["memory"]["host_peak"]["value"],
        "train_device_hours": tr["device_hours"],
        "train_peak": mem["peak"]["value"],
        "fits": mem["fits"],
        "steps": tr["steps"],
    }


def _knobs(
    cfg: Gap3dConfig, inp: PlanInputs, base: Planner, grad_ckpt: bool
) -> list[dict[str, Any]]:
    rows = [{"change": "(as configured)", **_summary(base)}]
    for label, overrides, ckpt in knob_list(cfg, grad_ckpt):
        try:
            vcfg = _variant(cfg, overrides) if overrides else cfg
        except Exception as e:  # noqa: BLE001 - a knob the config cannot take is reported
            rows.append({"change": label, "error": str(e)})
            continue
        vin = dataclasses.replace(inp, cfg=vcfg, grad_ckpt=ckpt, notes=[])
        try:
            rows.append({"change": label, **_summary(Planner(vin))})
        except Exception as e:  # noqa: BLE001
            rows.append({"change": label, "error": f"{type(e).__name__}: {e}"})
    return rows


def _warnings(cfg: Gap3dConfig, plan: dict[str, Any], disk_bytes: float | None) -> list[str]:
    out = []
    st = plan["storage"]
    need = st["store_bytes"] + st["source_shards"]["total_bytes"]
    free, where = disk_bytes, "--disk"
    if free is None:
        store = Path(cfg.store_path)
        free, where = _disk_free(store), f"free at {store.parent} on this machine"
    if free is not None and need > free:
        out.append(
            f"DISK: store + downloaded shards need {need / 1e12:.2f} TB, {where}: "
            f"{free / 1e12:.2f} TB"
        )
    mem = plan["memory"]["configured"]
    if not mem["fits"]:
        alt = [
            k["change"]
            for k in plan.get("knobs", [])
            if k.get("fits") and "error" not in k and k["change"] != "(as configured)"
        ]
        out.append(
            f"MEMORY: training needs {mem['peak']['value'] / 1e9:.1f} GB per device, the "
            f"{plan['target']['name']} has {mem['device_memory'] / 1e9:.0f} GB"
            + (f"; these fit: {', '.join(alt)}" if alt else "")
        )
    enc_mem = plan["encode"]["memory"]
    dev_peak = enc_mem["device_peak"]["value"]
    if (
        plan["target"]["kind"] == "cuda"
        and dev_peak == dev_peak
        and dev_peak > mem["device_memory"]
    ):
        out.append(
            f"MEMORY: the encoders need {dev_peak / 1e9:.1f} GB per GPU at their batch sizes; "
            "lower prompt_encoder.batch_size / image_encoder.batch_size"
        )
    parts = plan["encode"]["parts"]
    if plan["target"]["kind"] == "cuda" and parts["host"]["value"] > 2 * parts["forward"]["value"]:
        busy = parts["forward"]["value"] / (parts["host"]["value"] + parts["forward"]["value"])
        out.append(
            f"ENCODE: host-bound: a task spends {parts['host']['value'] * 1e3:.0f} ms/sample on "
            f"the CPU (decode, preprocess, write) and {parts['forward']['value'] * 1e3:.1f} ms on "
            f"the GPU, which is busy {busy:.0%} of the time; the encode GPU-hours are mostly "
            "waiting (faster host CPUs or overlapping decode with the forward pay off)"
        )
    limit = _parse_bytes(cfg.cluster.memory_limit)
    host = enc_mem["host_peak"]["value"]
    if limit and host > limit:
        out.append(
            f"MEMORY: an encode worker holds ~{host / 1e9:.1f} GB, above cluster.memory_limit "
            f"{cfg.cluster.memory_limit} (Dask pauses or restarts such workers); lower "
            "data.samples_per_shard or raise the limit"
        )
    tr = plan["train"]
    if tr["epochs"] < 1:
        out.append(
            f"TRAINING: {tr['steps']} steps x global batch {tr['global_batch']} see "
            f"{tr['epochs']:.0%} of the pairs once (use --epochs to plan by epochs)"
        )
    return out


def _sources(plan: dict[str, Any]) -> dict[str, str]:
    """The headline figures and where each comes from."""
    t = plan["target"]
    return {
        "device memory": t["memory_source"],
        "device peak FLOP/s": PUBLISHED if t["spec"] else MEASURED,
        "storage": plan["storage"]["combos"][plan["storage"]["configured"]]["groups"][
            "image tokens"
        ]["source"],
        "encode time": plan["encode"]["source"],
        "train step time": plan["train"]["step_s"]["source"],
        "train memory": plan["memory"]["configured"]["peak"]["source"],
        "FLOPs and memory parts": ANALYTIC + " (traced through the model code)",
    }
