"""Interrupted + resumed training equals uninterrupted training, and resume refuses a
checkpoint of another experiment."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_datamodule import make_synthetic_store, tiny_cfg

from gap3d.layout import TokenLayout
from gap3d.trainer.train import train

# 3 shards x 16 samples; ~5/6 'train', 20 % of those for val -> 32 train rows = 8 batches of 4
# per epoch, so the interruptions at steps 6 and 10 are mid-epoch (epochs 0 and 1).
N_STEPS, STOP, PERIODIC = 20, 10, 6
COMMON = (
    f"train.max_steps={N_STEPS}",
    "train.val_every_n_steps=8",
    f"train.checkpoint_every_n_steps={PERIODIC}",
    "train.deterministic=true",
    "train.warmup_steps=3",
)


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """``{step: value}`` over all CSV versions of a run (a resumed run writes a new one)."""
    out: dict[int, float] = {}
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        for r in csv.DictReader(f.open()):
            if r.get(key):
                out[int(r["step"])] = float(r[key])
    return out


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "s.zarr"
    make_synthetic_store(path)
    return path


def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, store: Path) -> None:
    ref_cfg = tiny_cfg(tmp_path / "ref", store, *COMMON)
    ref = train(ref_cfg, export=False)
    assert ref["step"] == N_STEPS

    # Interrupted at step 10 (last.ckpt at 10, periodic step00000006.ckpt kept) ...
    cut_cfg = tiny_cfg(tmp_path / "cut", store, *COMMON)
    cut = train(cut_cfg, stop_at_step=STOP, export=False)
    assert cut["step"] == STOP and cut["export_dir"] is None
    periodic = cut_cfg.run_dir / "checkpoints" / f"step{PERIODIC:08d}.ckpt"
    assert periodic.is_file() and final_state(cut_cfg.run_dir)["global_step"] == STOP
    # ... resumed from step 6 into another run dir (as if killed right after that checkpoint),
    from6_cfg = tiny_cfg(tmp_path / "from6", store, *COMMON)
    from6 = train(from6_cfg, resume=str(periodic), export=False)
    # ... and from last.ckpt (step 10) in place.
    from10 = train(cut_cfg, resume="last", export=False)
    assert from6["step"] == from10["step"] == N_STEPS

    want = final_state(ref_cfg.run_dir)
    ref_loss = logged(ref_cfg.run_dir, "train/loss")
    assert sorted(ref_loss) == list(range(N_STEPS))
    for run_dir, first in ((cut_cfg.run_dir, 0), (from6_cfg.run_dir, PERIODIC)):
        got = final_state(run_dir)
        for k, v in want["state_dict"].items():
            torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        for k, v in want["ema"]["shadow"].items():
            torch.testing.assert_close(got["ema"]["shadow"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert got["global_step"] == got["ema"]["num_updates"] == N_STEPS
        loss = logged(run_dir, "train/loss")
        assert sorted(loss) == list(range(first, N_STEPS))
        for step, value in loss.items():
            assert value == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-6), step
        for key in ("val/patch/cosine", "val/loss"):
            ref_val, val = logged(ref_cfg.run_dir, key), logged(run_dir, key)
            # in-loop validation logs at step index k-1, the final trainer.validate at k
            assert sorted(ref_val) == [7, 15, 20] and {15, 20} <= set(val)
            for step in set(val) & set(ref_val):
                assert val[step] == pytest.approx(ref_val[step], rel=1e-5, abs=1e-6)


def test_resume_refusals(tmp_path: Path, store: Path) -> None:
    cfg = tiny_cfg(
        tmp_path,
        store,
        "train.max_steps=4",
        "train.val_every_n_steps=4",
        "train.checkpoint_every_n_steps=4",
        "train.warmup_steps=1",
    )
    with pytest.raises(FileNotFoundError, match="no previous run"):
        train(cfg, resume="last")
    train(cfg, export=False)
    wider = tiny_cfg(
        tmp_path,
        store,
        "train.max_steps=4",
        "train.val_every_n_steps=4",
        "train.warmup_steps=1",
        "aligner.width=32",
        "train.lr=1e-4",
    )
    with pytest.raises(ValueError, match=r"different run.*aligner.*train\.lr: checkpoint 0\.001"):
        train(wider, resume="last")
    other = tmp_path / "other.zarr"
    make_synthetic_store(other, layout=TokenLayout(1, 0, 2, 2, 8), n_shards=2)
    moved = tiny_cfg(
        tmp_path, other, "train.max_steps=4", "train.val_every_n_steps=4", "train.warmup_steps=1"
    )
    split = (cfg.run_dir / "split.json").read_text()
    with pytest.raises(ValueError, match="store layout: checkpoint"):
        train(moved, resume="last")
    assert (cfg.run_dir / "split.json").read_text() == split  # refused: nothing overwritten
    with pytest.raises(ValueError, match="not a readable gap3d checkpoint"):
        bad = tmp_path / "bad.ckpt"
        bad.write_bytes(b"not a checkpoint")
        train(cfg, resume=str(bad))
