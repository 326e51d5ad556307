"""Cost planning: traces, published figures, store sizes, target choice, the plan and its CLI.

The end-to-end check of a plan against a real run is ``tests/test_plan_validation.py``.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from gap3d.cli import main as cli_main
from gap3d.config import AlignerConfig, LossWeights, load_config
from gap3d.layout import TokenLayout
from gap3d.plan import hardware
from gap3d.plan.estimate import PlanInputs, Planner, Target, val_rows
from gap3d.plan.plan import PlanError, make_plan, resolve_target
from gap3d.plan.trace import (
    AlignerCase,
    LiveBytes,
    _fake_mode,
    trace_sample_step,
    trace_train_step,
)

PAPER_LAYOUT = TokenLayout(1, 4, 37, 37, 1024)
SMALL_LAYOUT = TokenLayout(1, 4, 8, 8, 96)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # Trace results are cached under $GAP3D_CACHE; tests start from a fresh one per module
    # run so that the tracing code itself is exercised.
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path_factory.getbasetemp() / "gap3d-cache"))


def _case(depth: int = 3, batch: int = 4, ckpt: bool = False, precision: str = "32-true"):
    a = AlignerConfig(
        preset="small", width=64, depth=depth, heads=4, n_queries=8, resampler_depth=1
    )
    return AlignerCase.make(SMALL_LAYOUT, 16, 48, a, batch, ckpt, precision)


# ------------------------------------------------------------------------------------ traces


def test_fake_trace_equals_a_real_run_of_the_same_code() -> None:
    """LiveBytes on fake tensors sees exactly the bytes and FLOPs of the real computation."""
    from gap3d.trainer.flow import FlowMatching
    from gap3d.trainer.model import AlignerNet

    def run(fake: bool, ckpt: bool) -> tuple[int, int]:
        with _fake_mode() if fake else contextlib.nullcontext():
            torch.manual_seed(0)
            net = AlignerNet(SMALL_LAYOUT, 48, _case().aligner_cfg(depth=3))
            net.grad_checkpointing = ckpt
            flow = FlowMatching(net, SMALL_LAYOUT, LossWeights())
            live = LiveBytes()
            x0 = torch.randn(4, SMALL_LAYOUT.n_tokens, SMALL_LAYOUT.channels)
            cond, mask = torch.randn(4, 16, 48), torch.ones(4, 16, dtype=torch.bool)
            with live:
                loss, _ = flow.loss(x0, cond, mask)
                loss.backward()
            return live.peak, live.flops

    for ckpt in (False, True):
        assert run(True, ckpt) == run(False, ckpt)
    assert run(False, True)[0] < run(False, False)[0]  # checkpointing saves memory
    assert run(False, True)[1] > run(False, False)[1]  # ... and recomputes the forward


def test_depth_extrapolation_matches_a_full_trace() -> None:
    for ckpt, precision in ((False, "32-true"), (True, "bf16-mixed")):
        case = _case(depth=4, ckpt=ckpt, precision=precision)
        full, extra = trace_train_step(case, full=True), trace_train_step(case)
        for k in full:
            assert extra[k] == pytest.approx(full[k], rel=1e-6), (ckpt, precision, k)
    s = _case(depth=4)
    assert trace_sample_step(s, 3.0) == pytest.approx(trace_sample_step(s, 3.0, full=True))


def test_traced_costs_follow_the_settings() -> None:
    one, two = trace_train_step(_case(batch=2)), trace_train_step(_case(batch=4))
    static = one["weights"] + one["optimizer"] + one["ema"]
    assert one["weights"] == two["weights"] == 4 * one["params"]  # float32 master weights
    assert one["optimizer"] == 2 * one["weights"]  # AdamW: exp_avg + exp_avg_sq
    assert two["saved"] == pytest.approx(2 * one["saved"], rel=0.02)  # activations ~ batch
    assert two["flops"] == pytest.approx(2 * one["flops"], rel=0.02)
    assert one["peak"] > static + one["saved"] * 0.9
    ck = trace_train_step(_case(batch=4, ckpt=True))
    assert ck["saved"] < 0.5 * two["saved"] and ck["peak"] < two["peak"]
    bf16 = trace_train_step(_case(batch=4, precision="bf16-mixed"))
    assert bf16["saved"] < two["saved"]  # autocast keeps activations in bfloat16
    # Guided sampling runs the net on 2B rows: twice the FLOPs of an unguided step.
    assert trace_sample_step(_case(), 3.0)["flops"] == pytest.approx(
        2 * trace_sample_step(_case(), 1.0)["flops"]
    )


# ------------------------------------------------------------------------------- hardware


def test_published_devices_and_names() -> None:
    h100 = hardware.published_device("H100")
    assert h100.name == "h100-sxm" and h100.bf16_tflops == pytest.approx(989.4)
    assert hardware.published_device("a100 40gb").memory_gb == 40
    with pytest.raises(ValueError, match="no published figures for GPU 'tpu'"):
        hardware.published_device("tpu")
    assert hardware.match_device_name("NVIDIA H100 80GB HBM3").name == "h100-sxm"
    assert hardware.match_device_name("NVIDIA H100 PCIe").name == "h100-pcie"
    assert hardware.match_device_name("NVIDIA A100-SXM4-40GB").name == "a100-40gb"
    assert hardware.match_device_name("NVIDIA L40S").name == "l40s"
    assert hardware.match_device_name("NVIDIA GeForce RTX 4090").name == "rtx-4090"
    assert hardware.match_device_name("Some Accelerator") is None
    for d in hardware.PUBLISHED.values():  # every published figure names its source
        assert d.source and d.bf16_tflops > 0 and d.memory_gb > 0


def test_machine_description_and_matmul() -> None:
    m = hardware.describe_machine()
    assert m["cores"] and m["cpu_capability"] and isinstance(m["cuda_devices"], list)
    assert hardware.matmul_tflops("cpu", "float32", n=128) > 0
    assert hardware.versions()["torch"] == torch.__version__


# --------------------------------------------------------------------- storage and targets


def _paper_planner(pairs: int = 1000, gpu: str = "h100", **kw) -> Planner:
    cfg = load_config("paper", [f"{k}={v}" for k, v in kw.items()])
    target = resolve_target(cfg, None, gpu, [])
    return Planner(PlanInputs(cfg, pairs, 8, target))


def test_store_sizes_come_from_the_store_layout() -> None:
    st = _paper_planner().storage()
    T, C, L, D = 1374, 1024, 128, 2048
    f16 = st["combos"]["float16/none"]["per_array"]
    i8 = st["combos"]["int8/none"]["per_array"]
    assert f16["image_tokens"] == T * C * 2 + 16  # float16 + one shard-index entry
    assert i8["image_tokens"] == T * C + 16 and i8["image_scale"] == T * 4 + 16
    assert f16["prompt_latents"] == L * D * 2 + 16
    assert st["combos"]["float16/none"]["groups"]["image tokens"][
        "bytes_per_sample"
    ] == pytest.approx(2.81e6, rel=0.01)  # the README's 2.81 MB per sample
    assert st["configured"] == "int8/none"
    assert st["store_bytes"] == pytest.approx(st["combos"]["int8/none"]["total_bytes"], rel=0.01)
    assert st["combos"]["int8/none"]["groups"]["image tokens"]["source"] == "analytic"


def test_target_choice(tmp_path) -> None:
    notes: list[str] = []
    paper = load_config("paper")
    t = resolve_target(paper, None, None, notes)
    if not torch.cuda.is_available():
        assert t.name == hardware.DEFAULT_GPU and "no --gpu given" in notes[0]
    t = resolve_target(paper, None, "l40s", [])
    assert (t.kind, t.memory_bytes, t.memory_source, t.measured) == (
        "cuda",
        48e9,
        "published",
        False,
    )
    tiny = load_config("tiny", [f"workdir={tmp_path}"])
    with pytest.raises(PlanError, match="gap3d bench --config tiny"):
        resolve_target(tiny, None, None, [])
    cal = {"device": {"kind": "cpu", "name": "cpu-x", "memory_bytes": 8e9}, "machine": {}}
    t = resolve_target(tiny, cal, None, [])
    assert (t.kind, t.measured, t.memory_bytes) == ("cpu", True, 8e9)
    cal_gpu = {"device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85e9}}
    assert resolve_target(paper, cal_gpu, "h100", []).measured
    n: list[str] = []
    assert not resolve_target(paper, cal_gpu, "a100", n).measured and "not a100" in n[0]


def test_val_rows_follow_the_split_rule() -> None:
    cfg = load_config("tiny")
    frac = getattr(cfg.train, "val_fraction", None)  # configs before train.val_samples only
    want = round(100 * frac) if frac is not None else min(cfg.train.val_samples, 99)
    assert val_rows(cfg, 100) == want
    assert val_rows(cfg, 2) == 1


# ------------------------------------------------------------------------------ the plan


def test_paper_plan_for_a_named_gpu() -> None:
    cfg = load_config("paper")
    plan = make_plan(cfg, 31_000_000, 8, gpu="h100", knobs=False)
    assert plan["target"]["spec"]["source"].startswith("NVIDIA H100")
    assert plan["sources"]["device peak FLOP/s"] == "published"
    assert plan["sources"]["train step time"] == "analytic"
    tr, enc = plan["train"], plan["encode"]
    assert tr["steps"] == cfg.train.max_steps and tr["global_batch"] == 16 * 8
    assert tr["device_hours"] == pytest.approx(8 * tr["wall_s"] / 3600)
    assert enc["workers"] == 8 and enc["device_hours"] > 0
    assert "TFLOP/step (traced)" in tr["step_s"]["note"] and "assumed" in tr["step_s"]["note"]
    mem = plan["memory"]
    assert mem["with_ckpt"]["parts"]["activations"] < mem["without_ckpt"]["parts"]["activations"]
    assert mem["without_ckpt"]["params"] == pytest.approx(1.35e9, rel=0.05)  # the paper preset
    # --epochs turns epochs into steps over the training split
    p2 = make_plan(cfg, 1_000_000, 8, gpu="h100", epochs=2, knobs=False)
    n_train = 1_000_000 - val_rows(cfg, 1_000_000)
    assert p2["train"]["steps"] == int(np.ceil(2 * n_train / 128))


def test_plan_rejects_bad_input() -> None:
    cfg = load_config("paper")
    for kw, msg in (
        ({"pairs": 0}, "--pairs"),
        ({"pairs": 10, "gpus": 0}, "--gpus"),
        ({"pairs": 10, "epochs": -1}, "--epochs"),
    ):
        with pytest.raises(PlanError, match=msg):
            make_plan(cfg, kw.pop("pairs"), kw.pop("gpus", None), **kw)


def test_plan_cli_writes_json_and_markdown(tmp_path, capsys) -> None:
    out = tmp_path / "plan"
    rc = cli_main(
        [
            "plan",
            "--config",
            "paper",
            "--pairs",
            "31000000",
            "--gpus",
            "8",
            "--gpu",
            "h100",
            "--out",
            str(out),
            "--no-knobs",
        ]  # fmt: skip
    )
    assert rc == 0
    text = capsys.readouterr().out
    for heading in ("STORAGE", "ENCODE", "TRAINING", "MEMORY", "SOURCES", "GPU-hours"):
        assert heading in text
    plan = json.loads((out / "plan.json").read_text())
    assert plan["pairs"] == 31_000_000 and (out / "plan.md").read_text().startswith("# gap3d plan")
    # a CPU config without a calibration is refused with what to do
    rc = cli_main(["plan", "--config", "tiny", "--pairs", "10", f"workdir={tmp_path / 'w'}"])
    assert rc == 1 and "gap3d bench --config tiny" in capsys.readouterr().err
    rc = cli_main(["plan", "--config", "tiny", "--pairs", "10", "--calibration", str(tmp_path)])
    assert rc == 1 and "not found" in capsys.readouterr().err


def test_knob_list_covers_the_issue() -> None:
    from gap3d.plan.plan import knob_list

    labels = [k[0] for k in knob_list(load_config("paper"), False)]
    for want in (
        "store.encoding=float16",
        "prompt_encoder.max_length=64",
        "aligner.preset=base",
        "train.batch_size=32",
        "gradient checkpointing on",
        "data.samples_per_shard=256",
    ):
        assert want in labels


def test_target_memory_fit_is_decided_against_the_device() -> None:
    small = make_plan(
        load_config("paper", ["aligner.preset=small"]), 1000, 8, gpu="h100", knobs=False
    )
    assert small["memory"]["configured"]["fits"]
    tiny_gpu = make_plan(
        load_config("paper", ["aligner.preset=paper"]), 1000, 8, gpu="l4", knobs=False
    )
    assert not tiny_gpu["memory"]["configured"]["fits"]
    assert any(w.startswith("MEMORY: training needs") for w in tiny_gpu["warnings"])


def test_target_dataclass_roundtrip() -> None:
    t = Target("cuda", "x", 1e9, "published", hardware.published_device("l4"))
    assert t.to_dict()["spec"]["name"] == "l4"


# ------------------------------------------------------------------------------ paper shapes


def test_paper_shapes_architectures() -> None:
    from gap3d.encoders import shapes
    from gap3d.plan.models import analytic_encoder_cost, encoder_shapes

    d = shapes.dinov2_config()
    assert (d.hidden_size, d.num_hidden_layers, d.num_attention_heads) == (1024, 24, 16)
    assert (d.image_size, d.patch_size, d.num_register_tokens) == (518, 14, 4)
    q = shapes.qwen_config()
    assert (q.text_config.hidden_size, q.text_config.num_hidden_layers) == (2048, 2)
    assert q.text_config.intermediate_size == 11008 and q.vision_config.out_hidden_size == 2048
    assert shapes.full_depth("qwen2_5_vl_3b_2layers") == (2, 36)
    assert shapes.arch_for_model("facebook/dinov2-with-registers-large") == "dinov2_reg_large"
    assert shapes.paper_shapes_spec("Qwen/Qwen2.5-VL-3B-Instruct") == "shapes:qwen2_5_vl_3b_2layers"
    with pytest.raises(ValueError, match="unknown model 'shapes:vit'"):
        shapes.check_arch("vit")
    # The paper preset's shapes and costs, without any weights.
    paper = load_config("paper")
    assert encoder_shapes(paper) == (PAPER_LAYOUT, 2048)
    img = analytic_encoder_cost(paper, "image")
    assert img["params"] == pytest.approx(304e6, rel=0.01)  # ViT-L/14
    assert img["flops_per_sample"] == pytest.approx(1.0e12, rel=0.1)  # ~2 x params x 1374 + attn
    txt = analytic_encoder_cost(paper, "prompt", tokens=48)
    assert txt["params"] == pytest.approx(3.75e9, rel=0.02)  # Qwen2.5-VL-3B, vision tower included
    per_layer = 2 * 48 * 77.08e6  # 2 x tokens x the decoder layer's weights
    assert txt["flops_per_sample"] == pytest.approx(36 * per_layer, rel=0.05)


def test_shapes_spec_loads_through_the_encoder_code(tmp_path, monkeypatch) -> None:
    """``shapes:`` specs are built once, saved, and loaded by the real encoder classes (one
    DINOv2-L layer here to keep the test small: width, registers and grid are the real ones)."""
    from PIL import Image

    from gap3d.config import ImageEncoderConfig
    from gap3d.encoders import build_image_encoder, resolve_model_spec, shapes

    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path))
    monkeypatch.setitem(shapes.DINOV2_REG_LARGE, "num_hidden_layers", 1)
    src = resolve_model_spec("shapes:dinov2_reg_large")
    assert src.kind == "shapes" and src.path.parent == tmp_path / "shapes"
    enc = build_image_encoder(
        ImageEncoderConfig(name="dinov2_reg", model="shapes:dinov2_reg_large", image_size=518)
    )
    assert enc.layout == PAPER_LAYOUT
    tokens = enc.encode([Image.new("RGB", (600, 500), (200, 30, 30))])
    assert tokens.shape == (1, 1374, 1024) and torch.isfinite(tokens).all()
    assert resolve_model_spec("shapes:dinov2_reg_large").path == src.path  # built once


def test_bench_shards_synthetic_and_repacked(tmp_path) -> None:
    """Bench shards are img2dataset-like tars the real decoder reads; repacking copies the
    user's own samples byte for byte into shards of the configured size."""
    import tarfile

    from gap3d.pipeline.decode import decode_any
    from gap3d.pipeline.tars import read_tar
    from gap3d.plan.synthetic import repack_shards, write_synthetic_shards

    src = write_synthetic_shards(tmp_path / "src", 11, 5, 64, seed=3)
    assert len(src) == 3
    samples = [s for p in src for s in read_tar(p).samples]
    decoded = [decode_any(s, 10**8, 1000) for s in samples]
    assert all(d.valid and min(d.image.size) == 64 and d.caption for d in decoded)
    paths, n = repack_shards(src, tmp_path / "out", 7, 4)
    assert n == 7 and len(paths) == 2
    repacked = [s for p in paths for s in read_tar(p).samples]
    assert [s["__key__"] for s in repacked] == [s["__key__"] for s in samples[:7]]
    assert all(
        a["jpg"] == b["jpg"] and a["txt"] == b["txt"]
        for a, b in zip(repacked, samples[:7], strict=True)
    )
    with tarfile.open(paths[1]) as tf:
        assert len({m.name.split(".")[0] for m in tf}) == 3
