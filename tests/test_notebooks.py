"""The notebooks run headless (nbclient) on a tiny store and a quick real ``gap3d train`` run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from _inference_fixtures import tiny_setup
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny store (shared fixture) and a 4-step training run on it, via the real CLI.

    The config names every path *relatively*; ``GAP3D_ROOT`` anchors them. The notebooks run
    in ``notebooks/`` (as Jupyter runs them) with their default paths, so a path resolved
    against the working directory would not find the store.
    """
    setup = tiny_setup(tmp_path_factory)
    root = setup.root
    config = tmp_path_factory.mktemp("nb_run") / "tiny_test.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": "tiny",
                "workdir": "work",
                "generator": {"library": str(setup.library.relative_to(root))},
                "train": {
                    "run_dir": "nb_train_run",
                    "max_steps": 4,
                    "warmup_steps": 1,
                    "val_every_n_steps": 2,
                    "checkpoint_every_n_steps": 2,
                },
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GAP3D_ROOT": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "gap3d.cli", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "nb_train_run" / "export" / "aligner.json").exists()
    return {"config": config, "root": root, "store": setup.store_path}


def _execute(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Committed notebooks carry no outputs (they are re-run here and by users).
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), name
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    for k in ("GAP3D_STORE", "GAP3D_RUN_DIR"):
        monkeypatch.delenv(k, raising=False)  # the notebooks' defaults must find the data
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))  # the kernel inherits the environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # keep the kernel's inline backend
    client = NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_inspect_cache_notebook(run, monkeypatch):
    nb = _execute(
        "inspect_cache.ipynb",
        {"GAP3D_CONFIG": run["config"], "GAP3D_ROOT": run["root"]},
        monkeypatch,
    )
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "dinov2_reg" in text and "valid samples" in text and "every committed sample" in text
    assert _images(nb) >= 3  # samples + PCA, norms, neighbours


def test_training_notebook(run, monkeypatch):
    nb = _execute(
        "training.ipynb", {"GAP3D_CONFIG": run["config"], "GAP3D_ROOT": run["root"]}, monkeypatch
    )
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "last logged step 3" in text  # Lightning logs 0-based steps
    last = nb.cells[-1].outputs[-1]["data"]["text/plain"]
    assert "patch/cosine" in last
    assert _images(nb) >= 2  # curves, generated vs true
