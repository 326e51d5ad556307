"""``gap3d generate --prompts FILE``: one folder per prompt, ``results.csv`` + ``results.md``."""

from __future__ import annotations

import csv
import json

import pytest
from _inference_fixtures import tiny_setup
from PIL import Image

from gap3d.cli import main as gap3d_main
from gap3d.inference.batch import read_prompt_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


def test_text_file_one_prompt_per_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\na red square\n\n  a blue circle  \n")
    jobs = read_prompt_file(f)
    assert [j.prompt for j in jobs] == ["a red square", "a blue circle"]
    assert [j.index for j in jobs] == [0, 1] and jobs[1].line == 4


def test_csv_with_image_and_seed_columns(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    f = tmp_path / "p.csv"
    f.write_text('prompt,image,seed\na red square,img/a.png,5\n"a blue, round circle",,\n')
    jobs = read_prompt_file(f)
    assert jobs[0].image == str(tmp_path / "img" / "a.png") and jobs[0].seed == 5
    assert jobs[1].prompt == "a blue, round circle" and jobs[1].image is None
    assert jobs[1].seed is None


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.csv", "caption,seed\nx,1\n", "needs a 'prompt' column"),
        ("p.csv", "prompt,colour\nx,red\n", "unknown column"),
        ("p.csv", "prompt,seed\nx,abc\n", "not an integer"),
        ("p.csv", "prompt,image\nx,missing.png\n", "not found"),
        ("p.txt", "# only a comment\n\n", "no prompts"),
    ],
)
def test_bad_prompt_files_say_what_is_wrong(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_prompt_file(f)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompt_file(tmp_path / "nope.txt")


def test_batch_writes_a_folder_per_prompt_and_the_summary(setup, tmp_path, capsys):
    Image.new("RGB", (32, 32), (30, 60, 220)).save(tmp_path / "ref.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    f = tmp_path / "prompts.csv"
    f.write_text(
        "prompt,image,seed\n"
        "a red square,,1\n"
        "a blue circle,ref.png,2\n"
        "a green triangle,broken.png,3\n"
        "a red square,,\n"
    )
    out = tmp_path / "out"
    args = ["generate", "--config", "tiny", "--prompts", str(f), "--out", str(out)]
    rc = gap3d_main([*args, *setup.overrides, "sample.steps=2"])
    assert rc == 1  # one prompt failed; the others are there
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    assert "broken.png" in rows[2]["error"] or "identify" in rows[2]["error"]
    assert [r["seed"] for r in rows] == ["1", "2", "3", "0"]  # row 4: the config's seed
    for r in (rows[0], rows[1], rows[3]):
        folder = out / r["folder"]
        res = json.loads((folder / "result.json").read_text())
        assert res["prompt"] == r["prompt"] and res["settings"]["seed"] == int(r["seed"])
        assert (folder / "tokens.safetensors").exists() and (folder / "pca.png").exists()
        assert r["best_asset"] and (folder / "asset.glb").exists()
    assert rows[0]["folder"] != rows[3]["folder"]  # same prompt, two folders
    md = (out / "results.md").read_text()
    assert md.count("![preview](") == 3 and md.count("![pca](") == 3 and "**failed**" in md
    assert f"{rows[0]['folder']}/preview_0.png" in md
    err = capsys.readouterr().err
    assert "failed #2" in err

    # re-running reuses what is done and retries the failure
    (tmp_path / "broken.png").unlink()
    Image.new("RGB", (32, 32)).save(tmp_path / "broken.png")
    rc = gap3d_main([*args, *setup.overrides, "sample.steps=2"])
    assert rc == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["reused", "reused", "ok", "reused"]
    # other settings: nothing is reused
    rc = gap3d_main([*args, *setup.overrides, "sample.steps=3"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rc == 0 and {r["status"] for r in rows} == {"ok"}


def test_prompt_and_prompts_are_exclusive(setup, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a red square\n")
    with pytest.raises(SystemExit):
        gap3d_main(["generate", "--prompt", "x", "--prompts", str(f)])
    assert "not allowed with" in capsys.readouterr().err
    rc = gap3d_main(
        ["generate", "--config", "tiny", "--prompts", str(f), "--image", str(f), *setup.overrides]
    )
    assert rc == 1 and "'image' column" in capsys.readouterr().err
