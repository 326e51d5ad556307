"""Relative config paths resolve against the repository, not the working directory."""

from __future__ import annotations

from pathlib import Path

from gap3d.config import REPO_ROOT, load_config, project_root, resolve_path


def test_notebook_folder_resolves_to_the_repository(monkeypatch):
    monkeypatch.delenv("GAP3D_ROOT", raising=False)
    monkeypatch.chdir(REPO_ROOT / "notebooks")  # where Jupyter runs a notebook
    assert project_root() == REPO_ROOT.resolve()
    cfg = load_config("demo")
    assert cfg.store_path == str(REPO_ROOT.resolve() / "work" / "demo" / "features.zarr")
    assert cfg.export_dir == REPO_ROOT.resolve() / "work" / "demo" / "train" / "export"


def test_repository_root_keeps_relative_paths(monkeypatch):
    monkeypatch.delenv("GAP3D_ROOT", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    assert load_config("demo").store_path == "work/demo/features.zarr"


def test_outside_the_repository_the_working_directory_counts(monkeypatch, tmp_path):
    monkeypatch.delenv("GAP3D_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path.resolve()
    assert load_config("demo").work == Path("work/demo")


def test_gap3d_root_and_absolute_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("GAP3D_ROOT", str(tmp_path))
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    cfg = load_config("demo", [f"train.run_dir={tmp_path / 'abs'}", "store.path=st.zarr"])
    assert cfg.work == tmp_path / "work" / "demo"
    assert cfg.store_path == str(tmp_path / "st.zarr")
    # a URL is the store's location as given, never anchored or collapsed (s3:/ ...)
    url = load_config("demo", ["store.path=s3://bucket/prefix/f.zarr"]).store_path
    assert url == "s3://bucket/prefix/f.zarr"
    assert cfg.run_dir == tmp_path / "abs"
    assert str(resolve_path("s3://bucket/x")).startswith("s3:")
