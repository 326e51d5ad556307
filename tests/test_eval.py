"""``gap3d eval`` on a tiny store: ours + both baselines, JSON/markdown/plots, demo accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _inference_fixtures import tiny_setup

from gap3d.cli import main as gap3d_main
from gap3d.evaluation.baselines import mean_tokens
from gap3d.evaluation.evaluate import eval_rows, evaluate
from gap3d.store import FeatureStore
from gap3d.trainer.data import SPLIT_FILE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


def test_eval_writes_ours_and_both_baselines(setup, tmp_path):
    cfg = setup.cfg("eval.regressor_steps=3", "eval.steps=2", f"eval.out_dir={tmp_path / 'eval'}")
    result = evaluate(cfg, device="cpu")
    out = tmp_path / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["methods"]) == {"ours", "regressor", "mean"}
    n = saved["n_eval"]
    assert n["heldout"] == 4 and n["val"] >= 1 and n["all"] == n["val"] + n["heldout"]
    for method, groups in saved["methods"].items():
        assert set(groups) == {"all", "val", "heldout"}, method
        for key in (
            "patch/cosine",
            "cls/cosine",
            "register/cosine",
            "patch/mse",
            "patch/norm_ratio",
            "patch/top10_overlap",
            "retrieval/pooled/recall@1",
            "retrieval/cls/recall@10",
        ):
            assert np.isfinite(groups["all"][key]), (method, key)
    # The mean predictor's prediction is the same grid for every prompt.
    assert saved["methods"]["mean"]["all"]["patch/mse"] > 0
    demo = saved["demo_accuracy"]
    # True features are the library's own renders: retrieval must find their shape and colour.
    for g in ("val", "heldout"):
        assert demo["true_features"][g]["shape_colour"] == 1.0
        for m in ("ours", "regressor", "mean"):
            assert 0.0 <= demo[m][g]["shape_colour"] <= 1.0
    md = (out / "metrics.md").read_text()
    assert "| metric |" in md and "regressor baseline" in md and "mean-feature baseline" in md
    assert "held-out combinations" in md and "**" in md
    for f in ("metrics.png", "demo_accuracy.png", "pca_examples.png"):
        assert (out / f).stat().st_size > 1000, f
    assert result["settings"]["regressor"]["cached"] is False
    # The regressor is cached in the eval dir: a second run reuses it.
    again = evaluate(cfg, device="cpu")
    assert again["settings"]["regressor"]["cached"] is True
    assert again["methods"]["regressor"] == result["methods"]["regressor"]


def test_eval_rows_follow_the_trainers_split_file(setup, tmp_path):
    from gap3d.trainer.data import StoreDataModule

    cfg = setup.cfg(f"train.run_dir={tmp_path / 'run'}", "train.val_samples=3")
    store = FeatureStore.open(setup.store_path)
    train_all = store.indices(split="train")
    _, val_derived, heldout, note = eval_rows(cfg, store)
    assert "chose 3 validation rows" in note and len(heldout) == 4
    assert set(val_derived) <= set(train_all) and len(val_derived) == 3
    assert not (tmp_path / "run" / SPLIT_FILE).exists()  # evaluation writes nothing
    dm = StoreDataModule(cfg)
    dm.setup("fit")  # the trainer writes its split
    tr, va, _, note = eval_rows(cfg, store)
    assert sorted(va.tolist()) == sorted(dm.val_rows.tolist()) == sorted(val_derived.tolist())
    assert tr.tolist() == dm.train_rows.tolist() and "split.json" in note
    small = setup.cfg(
        f"train.run_dir={tmp_path / 'run'}", "eval.n_samples=4", "train.val_samples=3"
    )
    _, va, ho, _ = eval_rows(small, store)
    assert len(va) + len(ho) == 4 and len(va) >= 1


def test_mean_baseline_is_the_train_mean(setup):
    store = FeatureStore.open(setup.store_path)
    rows = store.indices(split="train")[:5]
    want = torch.as_tensor(store.read(rows)["image_tokens"]).mean(0)
    assert torch.allclose(mean_tokens(store, rows, batch=2), want, atol=1e-5)


def test_eval_cli(setup, tmp_path, capsys):
    rc = gap3d_main(
        [
            "eval",
            "--config",
            "tiny",
            "--out",
            str(tmp_path / "e"),
            *setup.overrides,
            "eval.regressor_steps=2",
            "eval.steps=2",
            "eval.n_samples=6",
        ]
    )
    # --out is a flag of the command; it must win over eval.out_dir
    assert rc == 0
    assert (tmp_path / "e" / "metrics.md").exists()
    assert "mean-feature baseline" in capsys.readouterr().out
