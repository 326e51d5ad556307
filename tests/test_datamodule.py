"""DataModule over the feature store: split, sampler purity/resume, workers, refusals.

``make_synthetic_store`` (also used by the training, resume and DDP tests) writes a real Zarr
store whose tokens are a learnable function of the prompt latents: each sample belongs to one
of K "concepts"; its prompt latents are the concept's embedding plus noise and its tokens the
concept's prototype grid plus noise. The last concept is marked ``heldout``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gap3d.config import Gap3dConfig, load_config
from gap3d.layout import TokenLayout
from gap3d.store import FeatureStore, ShardData
from gap3d.store.manifest import StoreSpec
from gap3d.trainer import split as splits
from gap3d.trainer.data import (
    DataError,
    StepBatchSampler,
    StoreBatchDataset,
    StoreDataModule,
    make_loader,
)

LAYOUT = TokenLayout(1, 2, 3, 3, 8)  # 12 tokens x 8 channels
PROMPT_LEN, PROMPT_DIM = 6, 16


def make_synthetic_store(
    path: Path,
    n_shards: int = 3,
    per_shard: int = 16,
    concepts: int = 6,
    commit: list[int] | None = None,
    seed: int = 0,
    layout: TokenLayout = LAYOUT,
    prompt_len: int = PROMPT_LEN,
    prompt_dim: int = PROMPT_DIM,
    layout_seed: int | None = None,
) -> FeatureStore:
    """A store of ``n_shards * per_shard`` samples with learnable structure (see module doc).

    ``layout_seed`` permutes each shard's samples before writing: the same samples (keys,
    data) at other rows, as two download runs of one URL list write them.
    """
    rng = np.random.default_rng(seed)
    protos = rng.normal(0, 1, (concepts, layout.n_tokens, layout.channels)) * 2.0
    # One vector per concept for all patches: absolute patch position is not what this data
    # tests (the aligner sees positions only through relative 2-D RoPE).
    protos[:, layout.patch_slice] = protos[:, layout.patch_slice][:, :1]
    embeds = rng.normal(0, 1, (concepts, prompt_len, prompt_dim))
    spec = StoreSpec(
        layout=layout,
        prompt_dim=prompt_dim,
        prompt_max_length=prompt_len,
        n_shards=n_shards,
        samples_per_shard=per_shard,
        prompt_encoder={"name": "qwen2_5_vl"},
        image_encoder={"name": "dinov2_reg"},
    )
    store = FeatureStore.open_or_create(path, spec)
    for s in commit if commit is not None else range(n_shards):
        c = rng.integers(0, concepts, per_shard)
        lengths = rng.integers(2, prompt_len + 1, per_shard)
        mask = np.arange(prompt_len)[None] < lengths[:, None]
        lat = (embeds[c] + 0.05 * rng.normal(size=(per_shard, prompt_len, prompt_dim))) * mask[
            ..., None
        ]
        tok = protos[c] + 0.05 * rng.normal(size=(per_shard, layout.n_tokens, layout.channels))
        keys = np.array([f"{s}-{i}" for i in range(per_shard)])
        if layout_seed is not None:
            at = np.random.default_rng([layout_seed, s]).permutation(per_shard)
            c, mask, lat, tok, keys = c[at], mask[at], lat[at], tok[at], keys[at]
        store.write_shard(
            s,
            ShardData(
                image_tokens=tok.astype(np.float32),
                prompt_latents=lat.astype(np.float32),
                prompt_mask=mask,
                caption=[f"concept {k}" for k in c],
                key=keys.tolist(),
                url=[""] * per_shard,
                split=["heldout" if k == concepts - 1 else "train" for k in c],
                meta=[{"concept": int(k)} for k in c],
                reason=[""] * per_shard,
                thumbnail=np.zeros((per_shard, 64, 64, 3), np.uint8),
            ),
        )
    return store


def tiny_cfg(tmp_path: Path, store_path: Path, *overrides: str) -> Gap3dConfig:
    """The tiny preset pointed at a synthetic store and a fresh run dir."""
    return load_config(
        "tiny",
        [
            f"workdir={tmp_path}",
            f"store.path={store_path}",
            f"train.run_dir={tmp_path / 'run'}",
            f"prompt_encoder.max_length={PROMPT_LEN}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dm") / "features.zarr"
    make_synthetic_store(path)
    return path


def test_split_is_deterministic_train_only_and_written(tmp_path: Path, store_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, store_path)
    dm = StoreDataModule(cfg)
    dm.setup("fit")
    store = FeatureStore.open(store_path)
    heldout = set(store.indices(split="heldout").tolist())
    train_all = set(store.indices(split="train").tolist())
    assert heldout and not heldout & (set(dm.train_rows.tolist()) | set(dm.val_rows.tolist()))
    assert set(dm.train_rows.tolist()) | set(dm.val_rows.tolist()) == train_all
    assert not set(dm.train_rows.tolist()) & set(dm.val_rows.tolist())
    assert len(dm.val_rows) == cfg.train.val_samples  # a fixed number, not a fraction
    saved = splits.load_rule(cfg.run_dir)
    assert (
        saved is not None
        and saved.seed == cfg.seed
        and "train" not in json.loads((cfg.run_dir / "split.json").read_text())
    )  # no row lists are stored
    # the split is a pure function of (seed, sample key): recompute it from the keys alone
    keys = store.read(np.array(sorted(train_all)), fields=["key"])["key"]
    from gap3d.store.commits import key_hash32

    score = splits.scores(key_hash32(keys), cfg.seed)
    rows = np.array(sorted(train_all))
    assert sorted(rows[score < np.uint64(saved.threshold)].tolist()) == sorted(dm.val_rows.tolist())
    other = splits.make_rule(splits.scores(key_hash32(keys), cfg.seed + 1), cfg.seed + 1, 4)
    _, va3 = splits.split_rows(rows, splits.scores(key_hash32(keys), cfg.seed + 1), other)
    assert sorted(va3.tolist()) != sorted(dm.val_rows.tolist())


def test_split_is_stable_when_the_store_grows(tmp_path: Path) -> None:
    """A run's samples keep their side (train / validation) when shards are added later."""
    path = tmp_path / "grow.zarr"
    make_synthetic_store(path, commit=[0, 2])
    cfg = tiny_cfg(tmp_path, path, "train.allow_partial_store=true", "train.val_samples=5")
    first = StoreDataModule(cfg)
    first.setup("fit")
    make_synthetic_store(path, commit=[1])  # the missing shard arrives
    later = StoreDataModule(cfg)
    later.setup("fit")
    old = set(first.train_rows.tolist()) | set(first.val_rows.tolist())
    assert set(first.val_rows.tolist()) <= set(later.val_rows.tolist())
    assert set(first.train_rows.tolist()) <= set(later.train_rows.tolist())
    assert (set(later.val_rows.tolist()) - set(first.val_rows.tolist())).isdisjoint(old)
    assert len(later.train_rows) > len(first.train_rows)


def test_statistics_cover_exactly_the_trained_rows(tmp_path: Path, store_path: Path) -> None:
    """Normalisation statistics come from the shards' partial moments with held-out and
    validation rows left out: equal to statistics computed directly over the train rows."""
    cfg = tiny_cfg(tmp_path, store_path, "train.val_samples=6")
    dm = StoreDataModule(cfg)
    dm.setup("fit")
    stats = dm.statistics()
    store = FeatureStore.open(store_path)
    tok = store.read(dm.train_rows, fields=["image_tokens"])["image_tokens"].astype(np.float64)
    for role, sl in (
        ("cls", LAYOUT.cls_slice),
        ("register", LAYOUT.register_slice),
        ("patch", LAYOUT.patch_slice),
    ):
        x = tok[:, sl].reshape(-1, LAYOUT.channels)
        # partial moments use the float32 tokens before float16 storage: equal to ~1e-3
        np.testing.assert_allclose(stats[f"{role}_mean"], x.mean(0), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stats[f"{role}_std"], x.std(0), rtol=2e-3, atol=2e-3)
    with_heldout = store.read(store.indices(), fields=["image_tokens"])["image_tokens"]
    assert not np.allclose(stats["cls_mean"], with_heldout[:, 0].mean(0), atol=2e-3)


def test_sampler_is_a_pure_function_of_the_step() -> None:
    rows = np.arange(100, 137)  # 37 rows, batch 4 x 2 ranks -> 4 batches per epoch
    full = StepBatchSampler(rows, 4, seed=3, rank=0, world_size=2)
    seq = [b for _ in range(3) for b in full]  # three epochs
    assert len(full) == 4 and len(seq) == 12
    assert seq == [full.batch(k) for k in range(12)]
    # every epoch is a permutation without repeats; epochs differ
    assert len(set(sum(seq[:4], []))) == 16 and seq[:4] != seq[4:8]
    # resume at step 6 (mid-epoch 1): first iteration finishes epoch 1, then epoch 2 follows
    resumed = StepBatchSampler(rows, 4, seed=3, rank=0, world_size=2, start_batch=6)
    assert list(resumed) == seq[6:8] and list(resumed) == seq[8:12]
    # the two ranks read disjoint halves of each global batch
    other = StepBatchSampler(rows, 4, seed=3, rank=1, world_size=2)
    assert not set(other.batch(5)) & set(full.batch(5))
    # block shuffle: still a permutation per epoch, batches made of runs of consecutive rows
    blocked = StepBatchSampler(rows, 8, seed=3, block=4)
    epoch = [r for b in blocked for r in b]
    assert len(set(epoch)) == len(epoch) == 32
    runs = [b[i : i + 4] for b in (blocked.batch(k) for k in range(4, 8)) for i in (0, 4)]
    assert sum(np.all(np.diff(sorted(r)) == 1) for r in runs) >= 6  # all but the wrap-around
    assert blocked.batch(4) != blocked.batch(0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatchSampler(rows[:3], 4, seed=0)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_loader_workers_fork_and_spawn(tmp_path: Path, store_path: Path, context: str) -> None:
    cfg = tiny_cfg(
        tmp_path, store_path, "train.num_workers=2", f"train.multiprocessing_context={context}"
    )
    dm = StoreDataModule(cfg)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2
    assert loader.multiprocessing_context.get_start_method() == context
    multi = list(loader)  # the DataModule's own loader, workers started with `context`
    store = FeatureStore.open(store_path)
    sampler = StepBatchSampler(dm.train_rows, cfg.train.batch_size, seed=cfg.seed)
    single = list(make_loader(StoreBatchDataset(store_path), sampler))
    assert len(multi) == len(single) == len(dm.train_rows) // cfg.train.batch_size
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["image_tokens"], b["image_tokens"])
    ref = store.read(single[0]["index"].numpy())
    # float16 between processes (the stored precision); the module casts to float32
    assert single[0]["image_tokens"].dtype == torch.float16
    np.testing.assert_array_equal(single[0]["image_tokens"].float().numpy(), ref["image_tokens"])
    np.testing.assert_array_equal(single[0]["prompt_mask"].numpy(), ref["prompt_mask"])


def test_refusals(tmp_path: Path, store_path: Path) -> None:
    empty = tmp_path / "empty.zarr"
    make_synthetic_store(empty, commit=[])
    with pytest.raises(DataError, match="no committed shards"):
        StoreDataModule(tiny_cfg(tmp_path, empty)).setup("fit")
    half = tmp_path / "half.zarr"
    make_synthetic_store(half, commit=[0, 2])
    with pytest.raises(DataError, match=r"half-committed: 1 of 3 shards missing.*allow_partial"):
        StoreDataModule(tiny_cfg(tmp_path, half)).setup("fit")
    dm = StoreDataModule(tiny_cfg(tmp_path, half, "train.allow_partial_store=true"))
    dm.setup("fit")
    assert any("committed part only: 2 of 3" in n for n in dm.notes)
    rows = set(dm.train_rows.tolist()) | set(dm.val_rows.tolist())
    assert rows and all(r < 16 or r >= 32 for r in rows)  # shard 1 = rows 16..31
    with pytest.raises(DataError, match="prompt latents of length 6.*max_length=48"):
        StoreDataModule(tiny_cfg(tmp_path, store_path, "prompt_encoder.max_length=48")).setup()
    with pytest.raises(FileNotFoundError, match="gap3d cache"):
        StoreDataModule(tiny_cfg(tmp_path, tmp_path / "nope.zarr")).setup()


def test_batches_and_eval_rows_do_not_depend_on_the_row_layout(tmp_path: Path) -> None:
    """Two caches of the same samples in different row orders (download order varies between
    runs) give the same training batches and the same evaluated samples, in the same order."""
    from gap3d.evaluation.evaluate import eval_rows

    seen = {}
    for name, layout_seed in (("a", None), ("b", 7)):
        path = tmp_path / f"{name}.zarr"
        store = make_synthetic_store(path, layout_seed=layout_seed)
        cfg = tiny_cfg(tmp_path / name, path, "eval.n_samples=6")
        dm = StoreDataModule(cfg)
        dm.setup("fit")
        loader = dm.train_dataloader()
        batches = [b for _ in range(2) for b in loader]  # two data epochs
        keys = store.read(np.arange(len(store)), fields=["key"])["key"]
        _, val, held, _ = eval_rows(cfg, store)
        seen[name] = {
            "row_keys": keys,
            "batch_keys": [[keys[i] for i in b["index"].tolist()] for b in batches],
            "tokens": [b["image_tokens"] for b in batches],
            "val": [keys[i] for i in val],
            "held": [keys[i] for i in held],
        }
    a, b = seen["a"], seen["b"]
    assert a["row_keys"] != b["row_keys"]  # the layouts really differ
    assert a["batch_keys"] == b["batch_keys"]
    assert all(torch.equal(x, y) for x, y in zip(a["tokens"], b["tokens"], strict=True))
    assert a["val"] == b["val"] and a["held"] == b["held"]
    # subsets of both groups were chosen, so the choice itself is what is compared
    n_held = len(FeatureStore.open(tmp_path / "a.zarr").indices(split="heldout"))
    assert 0 < len(a["held"]) < n_held and 0 < len(a["val"]) < cfg.train.val_samples
