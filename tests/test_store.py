"""The Zarr v3 feature store: round trips, commits, refusals, workers, partial moments."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from gap3d.layout import TokenLayout
from gap3d.store import (
    FeatureStore,
    ShardData,
    StoreError,
    StoreSpec,
)
from gap3d.store.codec import dequantize_int8, quantize_int8
from gap3d.store.manifest import MANIFEST_KEY

# Shaped like the tiny preset (DINOv2-reg, 56 px) and the demo preset (EfficientNet-Lite0).
LAYOUTS = {
    "tiny": (TokenLayout(1, 4, 4, 4, 64), 48, 64),
    "demo": (TokenLayout(1, 0, 7, 7, 1280), 32, 384),
}
IMAGE_INFO = {"name": "dinov2_reg", "model": "tiny:dinov2_reg", "revision": None, "layer": "x"}
PROMPT_INFO = {"name": "qwen2_5_vl", "model": "tiny:qwen2_5_vl", "revision": None}


def make_spec(
    kind: str = "tiny",
    encoding: str = "float16",
    n_shards: int = 3,
    samples_per_shard: int = 6,
    **kw,
) -> StoreSpec:
    layout, length, dim = LAYOUTS[kind]
    args = dict(
        layout=layout,
        prompt_dim=dim,
        prompt_max_length=length,
        n_shards=n_shards,
        samples_per_shard=samples_per_shard,
        encoding=encoding,
        prompt_encoder=dict(PROMPT_INFO),
        image_encoder=dict(IMAGE_INFO),
        prompt_template="{caption}",
        config_hash="abc",
    )
    args.update(kw)
    return StoreSpec(**args)


def realistic_tokens(rng: np.random.Generator, n: int, layout: TokenLayout) -> np.ndarray:
    """Layer-normed tokens with a few large outlier channels, like ViT features."""
    x = rng.standard_normal((n, layout.n_tokens, layout.channels)).astype(np.float32)
    # Outlier channels stretch the absmax scale, the hard case for int8: at 4x the min per-token
    # cosine is ~0.9997 (C=1280); at 8x it drops to ~0.9989 (see benchmarks/results/store.md).
    x[..., :3] *= 4.0
    x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    return x


def make_shard(spec: StoreSpec, n: int, seed: int, invalid: tuple[int, ...] = ()) -> ShardData:
    rng = np.random.default_rng(seed)
    lay, length, dim = spec.layout, spec.prompt_max_length, spec.prompt_dim
    tok = realistic_tokens(rng, n, lay)
    lat = rng.standard_normal((n, length, dim)).astype(np.float32)
    lengths = rng.integers(1, length + 1, size=n)
    mask = np.arange(length)[None, :] < lengths[:, None]
    lat[~mask] = 0.0
    reason = ["download_failed" if i in invalid else "" for i in range(n)]
    for i in invalid:
        tok[i] = 0.0
        lat[i] = 0.0
    return ShardData(
        image_tokens=tok,
        prompt_latents=lat,
        prompt_mask=mask,
        caption=[f"a caption {seed}-{i} é" for i in range(n)],
        key=[f"{seed:03d}{i:04d}" for i in range(n)],
        url=[f"http://127.0.0.1/{seed}/{i}.jpg" for i in range(n)],
        split=["heldout" if i % 3 == 2 else "train" for i in range(n)],
        meta=[{"seed": seed, "i": i, "w": 64} for i in range(n)],
        reason=reason,
        thumbnail=rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8),
    )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("kind", ["tiny", "demo"])
@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_round_trip(tmp_path: Path, kind: str, encoding: str) -> None:
    spec = make_spec(kind, encoding)
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    full, part = make_shard(spec, 6, seed=1), make_shard(spec, 4, seed=2, invalid=(1,))
    store.write_shard(0, full)
    marker = store.write_shard(2, part)  # a short shard: its tail rows are not samples
    assert marker["n_samples"] == 4 and marker["n_valid"] == 3
    assert marker["reasons"] == {"download_failed": 1}

    rows = store.indices()
    assert rows.tolist() == [0, 1, 2, 3, 4, 5, 12, 14, 15]
    assert store.indices(valid_only=False).tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15]
    assert store.indices(split="heldout").tolist() == [2, 5, 14]
    assert store.invalid_counts() == {"download_failed": 1}

    order = [14, 0, 5, 12, 0]  # unsorted, across shards, with a repeat
    got = store.read(order)
    src = {0: (full, 0), 5: (full, 5), 12: (part, 0), 14: (part, 2)}
    want_tok = np.stack([src[i][0].image_tokens[src[i][1]] for i in order])
    assert got["image_tokens"].dtype == np.float32
    assert got["image_tokens"].shape == (5, spec.layout.n_tokens, spec.layout.channels)
    if encoding == "float16":
        np.testing.assert_allclose(got["image_tokens"], want_tok, rtol=1e-3, atol=1e-3)
    else:
        # absmax int8: error per element at most half a quantisation step
        step = np.abs(want_tok).max(-1, keepdims=True) / 127.0
        assert np.all(np.abs(got["image_tokens"] - want_tok) <= 0.5 * step * (1 + 1e-5) + 1e-7)
        assert cosine(got["image_tokens"], want_tok).min() > 0.999
    want_lat = np.stack([src[i][0].prompt_latents[src[i][1]] for i in order])
    np.testing.assert_allclose(got["prompt_latents"], want_lat, rtol=1e-3, atol=1e-3)
    assert got["prompt_latents"].dtype == np.float32
    want_mask = np.stack([src[i][0].prompt_mask[src[i][1]] for i in order])
    assert got["prompt_mask"].dtype == bool and np.array_equal(got["prompt_mask"], want_mask)
    assert got["caption"] == [src[i][0].caption[src[i][1]] for i in order]
    assert got["meta"] == [src[i][0].meta[src[i][1]] for i in order]
    assert got["split"] == [src[i][0].split[src[i][1]] for i in order]
    assert got["key"] == [src[i][0].key[src[i][1]] for i in order]
    assert np.array_equal(
        got["thumbnail"], np.stack([src[i][0].thumbnail[src[i][1]] for i in order])
    )
    assert got["index"].tolist() == order

    # an int gives one sample without the batch axis; an invalid row reads back as zeros
    one = store.read(13)
    assert one["image_tokens"].shape == (spec.layout.n_tokens, spec.layout.channels)
    assert one["caption"] == part.caption[1] and one["reason"] == "download_failed"
    assert not one["valid"] and not one["image_tokens"].any() and not one["prompt_latents"].any()
    assert store.read([], fields=["caption"])["caption"] == []


def test_int8_codec_bounds() -> None:
    rng = np.random.default_rng(0)
    x = realistic_tokens(rng, 8, TokenLayout(1, 4, 16, 16, 256))
    x[0, 0] = 0.0  # an all-zero token must not divide by zero
    x[0, 1] *= 1e-6  # a tiny token keeps its direction
    x[0, 2] *= 1e6  # and so does one beyond float16's range
    q, s = quantize_int8(x)
    assert q.dtype == np.int8 and s.dtype == np.float32 and np.abs(q).max() <= 127
    y = dequantize_int8(q, s)
    assert not y[0, 0].any()
    cos = cosine(y.reshape(-1, 256)[1:], x.reshape(-1, 256)[1:])
    assert cos.min() > 0.999 and cos.mean() > 0.9999


def test_manifest_alone_decodes(tmp_path: Path) -> None:
    """A reader with only zarr and the manifest (no gap3d code defaults) gets the tokens."""
    spec = make_spec("tiny", "int8")
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    data = make_shard(spec, 6, seed=3)
    store.write_shard(1, data)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    m = group.attrs[MANIFEST_KEY]
    enc = m["image_tokens_encoding"]
    rows = slice(m["samples_per_shard"], 2 * m["samples_per_shard"])
    env = {name: group[name][rows] for name in enc["arrays"]}
    tokens = eval(enc["decode"], {}, env)  # the manifest's own decode rule
    assert tokens.shape == (6, *m["arrays"]["image_tokens"]["shape"][1:])
    assert cosine(tokens, data.image_tokens).min() > 0.999
    lay = m["layout"]
    assert m["token_roles"]["patch"] == [5, 5 + lay["grid_h"] * lay["grid_w"]]
    assert m["image_encoder"]["model"] == "tiny:dinov2_reg" and m["config_hash"] == "abc"


def test_annotate(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr", make_spec())
    store.annotate("cache", {"invalid_counts": {"x": 1}})
    assert FeatureStore.open(tmp_path / "s.zarr").manifest["cache"] == {"invalid_counts": {"x": 1}}
    with pytest.raises(StoreError, match="cannot be overwritten"):
        store.annotate("layout", {})
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(tmp_path / "s.zarr").annotate("cache", {})


def _raw(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    m = g.attrs[MANIFEST_KEY]
    return {name: np.asarray(g[name][:]) for name in m["arrays"]}


def test_idempotent_rewrite(tmp_path: Path) -> None:
    spec = make_spec("tiny", "int8")
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    store.write_shard(1, make_shard(spec, 5, seed=7))
    first = _raw(tmp_path / "s.zarr")
    info = store.write_shard(1, make_shard(spec, 5, seed=7))
    again = _raw(tmp_path / "s.zarr")
    for name in first:
        assert np.array_equal(first[name], again[name]), name
    assert info["n_samples"] == 5 and store.committed_shards() == [1]
    # a rewrite with fewer samples replaces the region and the marker
    store.write_shard(1, make_shard(spec, 2, seed=8))
    assert store.indices().tolist() == [6, 7]
    assert store.read(8, fields=["caption"])["caption"] == ""


def test_resume_half_written_store(tmp_path: Path) -> None:
    spec = make_spec("tiny", "float16")
    shards = {s: make_shard(spec, 6 - s, seed=s, invalid=(s,)) for s in range(3)}
    one_go = FeatureStore.create(tmp_path / "one.zarr", spec)
    for s, d in shards.items():
        one_go.write_shard(s, d)

    partial = FeatureStore.open_or_create(tmp_path / "two.zarr", spec)
    partial.write_shard(0, shards[0])
    partial.write_shard(2, shards[2])
    del partial  # "interrupted"
    resumed = FeatureStore.open_or_create(tmp_path / "two.zarr", spec)
    assert resumed.missing_shards() == [1] and not resumed.is_committed(1)
    assert resumed.committed_shards() == [0, 2]
    for s in resumed.missing_shards():
        resumed.write_shard(s, shards[s])
    assert resumed.missing_shards() == []
    a, b = _raw(tmp_path / "one.zarr"), _raw(tmp_path / "two.zarr")
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert one_go.invalid_counts() == resumed.invalid_counts() == {"download_failed": 3}
    assert np.array_equal(one_go.indices(), resumed.indices())


def test_grow_keeps_committed_shards(tmp_path: Path) -> None:
    spec = make_spec("tiny", n_shards=2)
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    data = make_shard(spec, 6, seed=4)
    store.write_shard(1, data)
    bigger = FeatureStore.open_or_create(tmp_path / "s.zarr", make_spec("tiny", n_shards=4))
    assert len(bigger) == 24 and bigger.missing_shards() == [0, 2, 3]
    assert FeatureStore.open(tmp_path / "s.zarr").n_shards == 4
    assert bigger.read(6, fields=["caption"])["caption"] == data.caption[0]
    bigger.write_shard(3, make_shard(spec, 1, seed=5))
    assert bigger.indices().tolist() == [6, 7, 8, 9, 10, 11, 18]
    # a grow interrupted after resizing one array still opens at the old size, and finishes
    zarr.open_array(str(tmp_path / "s.zarr" / "valid"), mode="r+").resize((30,))
    assert len(FeatureStore.open(tmp_path / "s.zarr")) == 24
    done = FeatureStore.open_or_create(tmp_path / "s.zarr", make_spec("tiny", n_shards=5))
    assert len(done) == 30 and done.indices().tolist() == [6, 7, 8, 9, 10, 11, 18]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"image_encoder": {**IMAGE_INFO, "model": "facebook/dinov2-with-registers-large"}},
            "image_encoder.model",
        ),
        ({"prompt_encoder": {**PROMPT_INFO, "revision": "abc123"}}, "prompt_encoder.revision"),
        ({"layout": TokenLayout(1, 0, 4, 4, 64)}, "layout"),
        ({"prompt_dim": 32}, "prompt_dim"),
        ({"prompt_max_length": 16}, "prompt_max_length"),
        ({"encoding": "int8"}, "encoding"),
        ({"samples_per_shard": 8}, "samples_per_shard"),
        ({"n_shards": 2}, "n_shards"),
    ],
)
def test_open_or_create_refuses_incompatible(tmp_path: Path, change: dict, field: str) -> None:
    FeatureStore.create(tmp_path / "s.zarr", make_spec())
    with pytest.raises(StoreError) as e:
        FeatureStore.open_or_create(tmp_path / "s.zarr", make_spec(**change))
    msg = str(e.value)
    assert field in msg and "new store path" in msg
    # runtime-only encoder keys (device, batch size) do not block reuse
    FeatureStore.open_or_create(
        tmp_path / "s.zarr", make_spec(image_encoder={**IMAGE_INFO, "device": "cuda"})
    )


def test_open_refusals(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such feature store"):
        FeatureStore.open(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a gap3d feature store"):
        FeatureStore.open(tmp_path / "plain")
    with pytest.raises(StoreError, match="already exists"):
        FeatureStore.create(tmp_path / "plain", make_spec())
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a gap3d feature store"):
        FeatureStore.open(tmp_path / "other.zarr")

    good = tmp_path / "s.zarr"
    FeatureStore.create(good, make_spec())

    def variant(name: str) -> Path:
        p = tmp_path / name
        shutil.copytree(good, p)
        return p

    p = variant("schema.zarr")
    g = zarr.open_group(str(p), mode="r+")
    g.update_attributes({MANIFEST_KEY: {**g.attrs[MANIFEST_KEY], "schema_version": 99}})
    with pytest.raises(StoreError, match="schema_version 99"):
        FeatureStore.open(p)

    p = variant("half.zarr")  # creation interrupted before the manifest was written
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"] = {"gap3d_creating": True}
    (p / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="never finished"):
        FeatureStore.open(p)

    p = variant("garbled.zarr")
    (p / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot read"):
        FeatureStore.open(p)

    p = variant("noarray.zarr")
    shutil.rmtree(p / "image_tokens")
    with pytest.raises(StoreError, match="'image_tokens' is missing"):
        FeatureStore.open(p)

    p = variant("truncated.zarr")
    zarr.open_array(str(p / "prompt_latents"), mode="r+").resize((6, 48, 64))
    with pytest.raises(StoreError, match="'prompt_latents' has shape"):
        FeatureStore.open(p)

    p = variant("moments.zarr")
    shutil.rmtree(p / "moments" / "m2")
    with pytest.raises(StoreError, match="'moments/m2' is missing"):
        FeatureStore.open(p)


def test_write_validation(tmp_path: Path) -> None:
    spec = make_spec()
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    data = make_shard(spec, 3, seed=0)
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(tmp_path / "s.zarr").write_shard(0, data)
    with pytest.raises(StoreError, match="outside"):
        store.write_shard(3, data)
    bad = make_shard(spec, 3, seed=0)
    bad.image_tokens = bad.image_tokens[:, :-1]
    with pytest.raises(StoreError, match="image_tokens has shape"):
        store.write_shard(0, bad)
    bad = make_shard(spec, 3, seed=0)
    bad.split = ["train", "val", "train"]
    with pytest.raises(StoreError, match="split values"):
        store.write_shard(0, bad)
    with pytest.raises(StoreError, match="exceed samples_per_shard"):
        store.write_shard(0, make_shard(spec, 7, seed=0))
    assert store.committed_shards() == []  # nothing half-written got committed
    # non-finite features become an invalid sample with a reason instead of poisoning training
    nan = make_shard(spec, 3, seed=0)
    nan.image_tokens[1, 0, 0] = np.nan
    assert store.write_shard(0, nan)["reasons"] == {"non_finite_features": 1}
    assert store.indices().tolist() == [0, 2]
    with pytest.raises(StoreError, match="out of range"):
        store.read(18)


class _StoreDataset(torch.utils.data.Dataset):
    """What a trainer does: one store object pickled into every worker."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.rows = store.indices()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.store.read(int(self.rows[i]), fields=["image_tokens", "prompt_mask", "caption"])
        return {
            "tokens": torch.from_numpy(r["image_tokens"]),
            "index": int(r["index"]),
            "caption": r["caption"],
        }


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(tmp_path: Path, context: str) -> None:
    """A store object pickled (spawn) or forked into DataLoader workers reopens its handles
    there. tensorstore cannot survive a fork, so a parent that forks reads through zarr."""
    spec = make_spec("tiny", "int8", n_shards=2, samples_per_shard=8)
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    store.write_shard(0, make_shard(spec, 8, seed=0))
    store.write_shard(1, make_shard(spec, 5, seed=1))
    reader = FeatureStore.open(tmp_path / "s.zarr", reader="zarr" if context == "fork" else "auto")
    reader.read(0)  # the parent has used the store (and zarr's event loop) before the fork
    loader = torch.utils.data.DataLoader(
        _StoreDataset(reader),
        batch_size=4,
        num_workers=2,
        multiprocessing_context=context,
    )
    seen = {}
    for batch in loader:
        for j, idx in enumerate(batch["index"].tolist()):
            seen[idx] = (batch["tokens"][j].numpy(), batch["caption"][j])
    assert sorted(seen) == reader.indices().tolist()
    for idx, (tok, cap) in seen.items():
        direct = reader.read(idx, fields=["image_tokens", "caption"])
        assert np.array_equal(tok, direct["image_tokens"]) and cap == direct["caption"]


def _write_one(path: str, shard: int) -> None:
    store = FeatureStore.open(path, "r+")
    store.write_shard(shard, make_shard(store_spec_of(store), 6, seed=shard))


def store_spec_of(store: FeatureStore) -> StoreSpec:
    return make_spec(
        "tiny", store.encoding, n_shards=store.n_shards, samples_per_shard=store.samples_per_shard
    )


def test_concurrent_writers(tmp_path: Path) -> None:
    """Several processes, one shard each, as the Dask cache stage runs them."""
    spec = make_spec("tiny", "float16", n_shards=4)
    FeatureStore.create(tmp_path / "s.zarr", spec)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_one, args=(str(tmp_path / "s.zarr"), s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.committed_shards() == [0, 1, 2, 3] and len(store.indices()) == 24
    for s in range(4):
        want = make_shard(spec, 6, seed=s)
        assert store.read(s * 6 + 5, fields=["caption"])["caption"] == want.caption[5]


def _role_tokens(tokens: np.ndarray, layout: TokenLayout) -> dict[str, np.ndarray]:
    out = {}
    for role, sl in (
        ("cls", layout.cls_slice),
        ("register", layout.register_slice),
        ("patch", layout.patch_slice),
    ):
        out[role] = tokens[:, sl].reshape(-1, layout.channels).astype(np.float64)
    return out


def test_partial_moments_match_direct_computation(tmp_path: Path) -> None:
    """Per-shard partial moments (float32 tokens of valid train rows, before int8 storage),
    merged, equal the moments computed directly over those rows; held-out and invalid rows
    never enter them."""
    spec = make_spec("tiny", "int8", n_shards=3)
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    shards = {0: make_shard(spec, 6, seed=0, invalid=(2,)), 2: make_shard(spec, 3, seed=2)}
    for s_id, d in shards.items():
        store.write_shard(s_id, d)
    rows = [
        d.image_tokens[i]
        for d in shards.values()
        for i in range(len(d))
        if d.split[i] == "train" and not d.reason[i]
    ]
    direct = _role_tokens(np.stack(rows), spec.layout)
    merged = store.moments()
    for role, x in direct.items():
        assert merged[role].n == len(x)
        np.testing.assert_allclose(merged[role].mean, x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged[role].std, x.std(0), rtol=1e-5, atol=1e-6)
    # a subset of shards merges only those
    only2 = store.moments([2])
    assert only2["cls"].n == sum(1 for i in range(3) if shards[2].split[i] == "train")
    with pytest.raises(StoreError, match="not committed"):
        store.moments([1])
    # merging with no shard, and the stats form, skip empty roles
    from gap3d.store.stats import to_stats

    assert set(to_stats(merged)) == {
        f"{r}_{k}" for r in ("cls", "register", "patch") for k in ("mean", "std")
    }


def test_moments_remove_and_merge_are_inverse() -> None:
    from gap3d.store.stats import Moments

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)) * 3 + 1
    a, b = Moments.of(x[:380]), Moments.of(x[380:])
    whole = a.merge(b)
    np.testing.assert_allclose(whole.mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(whole.std, x.std(0), rtol=1e-6)
    rest = whole.remove(b)
    assert rest.n == 380
    np.testing.assert_allclose(rest.mean, x[:380].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rest.std, x[:380].std(0), rtol=1e-5, atol=1e-6)


def test_statistics_do_not_depend_on_sample_order() -> None:
    """The cache stage reduces a shard in download order, which varies between runs: the
    float32 statistics the trainer uses must come out the same for any order."""
    from gap3d.layout import TokenLayout
    from gap3d.store.stats import RoleMoments, to_stats

    layout = TokenLayout(1, 0, 7, 7, 1280)  # the demo's grid
    rng = np.random.default_rng(3)
    tokens = np.maximum(rng.standard_normal((96, layout.n_tokens, 1280)), 0).astype(np.float32)
    tokens *= rng.uniform(0.1, 6.0, 1280).astype(np.float32)  # ReLU6-like, channel scales
    stats = []
    for order in (np.arange(96), rng.permutation(96), rng.permutation(96)):
        acc = RoleMoments(layout)
        for lo in range(0, 96, 32):  # encode batches of 32 in that order
            acc.update(tokens[order[lo : lo + 32]])
        stats.append({k: v.astype(np.float32) for k, v in to_stats(acc.parts).items()})
    for other in stats[1:]:
        for k in stats[0]:
            np.testing.assert_array_equal(stats[0][k], other[k])


def test_stats_omit_empty_roles(tmp_path: Path) -> None:
    from gap3d.store.stats import to_stats

    spec = make_spec("demo", "float16", n_shards=1, samples_per_shard=4)  # no registers
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    store.write_shard(0, make_shard(spec, 4, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = to_stats(store.moments())
    assert set(stats) == {"cls_mean", "cls_std", "patch_mean", "patch_std"}
    assert stats["patch_mean"].shape == (1280,)
