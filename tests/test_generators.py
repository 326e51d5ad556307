"""Generator adapters: retrieval (real tiny encoder + library), features, TRELLIS contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _inference_fixtures import tiny_setup
from safetensors.torch import load_file

from gap3d.inference.generators import build_generator
from gap3d.inference.generators.retrieval import SCORE_KINDS, asset_scores, view_scores
from gap3d.inference.generators.trellis import (
    INSTALL_HELP,
    TRELLIS_LAYOUT,
    TrellisGenerator,
    check_trellis_contract,
)
from gap3d.inference.library_index import build_library_index, load_library
from gap3d.layout import TokenLayout
from gap3d.store import FeatureStore


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


def test_retrieval_finds_the_asset_of_its_own_render_tokens(setup, tmp_path):
    cfg = setup.cfg()
    manifest = FeatureStore.open(setup.store_path).manifest
    gen = build_generator(cfg, manifest)  # builds (and caches) the library index
    index = gen.index
    assert index.tokens.shape[1:] == (21, 64) and len(index.assets) == 9
    scores = gen.rank(index.tokens)
    for kind in SCORE_KINDS:
        assert torch.equal(scores[kind].argmax(1), index.view_asset), kind
    # generate() on one render's tokens: the result names that asset and copies its files
    v = 5
    res = gen.generate(index.tokens[v : v + 1], tmp_path, "a prompt")
    want = index.assets[int(index.view_asset[v])]
    assert res["best"]["asset_id"] == want.asset_id
    assert (
        res["best"]["shape"] == want.meta["shape"] and res["best"]["colour"] == want.meta["colour"]
    )
    assert len(res["samples"][0]["top_k"]) == cfg.generator.top_k
    assert (tmp_path / "asset.glb").read_bytes() == want.glb.read_bytes()
    assert all((tmp_path / p).exists() for p in res["best"]["previews"])


def test_library_index_is_cached_per_encoder(setup, monkeypatch):
    cfg = setup.cfg()
    manifest = FeatureStore.open(setup.store_path).manifest
    first = build_library_index(cfg, manifest)
    assert (setup.library / "index" / f"{first.key}.safetensors").exists()

    def no_encoder(*a, **k):
        raise AssertionError("the cached index should have been used")

    monkeypatch.setattr("gap3d.encoders.build_image_encoder", no_encoder)
    again = build_library_index(cfg, manifest)
    assert again.key == first.key and torch.equal(again.tokens, first.tokens)
    other = dict(manifest, image_encoder={**manifest["image_encoder"], "revision": "other"})
    with pytest.raises(AssertionError, match="cached index"):
        build_library_index(cfg, other)  # a different encoder never reuses the index


def test_asset_scores_take_the_best_view_and_scores_match_a_loop():
    torch.manual_seed(0)
    lay = TokenLayout(1, 0, 2, 3, 8)
    q, views = torch.randn(3, lay.n_tokens, 8), torch.randn(5, lay.n_tokens, 8)
    centres = {"patch": torch.zeros(8), "cls": torch.zeros(8)}
    s = view_scores(q, views, lay, centres)
    cos = torch.nn.functional.cosine_similarity
    for b in range(3):
        for v in range(5):
            patch = cos(q[b, 1:], views[v, 1:], dim=-1).mean()
            pooled = cos(q[b, 1:].mean(0), views[v, 1:].mean(0), dim=0)
            cls = cos(q[b, 0], views[v, 0], dim=0)
            assert s["patch"][b, v] == pytest.approx(patch.item(), abs=1e-5)
            assert s["pooled"][b, v] == pytest.approx(pooled.item(), abs=1e-5)
            assert s["cls"][b, v] == pytest.approx(cls.item(), abs=1e-5)
    view_asset = torch.tensor([0, 0, 1, 2, 2])
    a = asset_scores(s["combined"], view_asset, 3)
    assert torch.allclose(a[:, 0], s["combined"][:, :2].max(1).values)
    assert torch.allclose(a[:, 2], s["combined"][:, 3:].max(1).values)


def test_load_library_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="gap3d demo-data"):
        load_library(tmp_path)
    (tmp_path / "library.json").write_text(json.dumps([{"asset_id": "a", "renders": ["x.png"]}]))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_library(tmp_path)


def test_features_generator_writes_tokens_and_layout(setup, tmp_path):
    cfg = setup.cfg()
    manifest = FeatureStore.open(setup.store_path).manifest
    gen = build_generator(cfg, manifest, name="features")
    tokens = torch.randn(2, 21, 64)
    res = gen.generate(tokens, tmp_path, "p")
    t = load_file(str(tmp_path / "features.safetensors"))
    assert torch.equal(t["tokens"], tokens)
    assert t["patches"].shape == (2, 4, 4, 64) and torch.equal(t["patches"][1, 0, 1], tokens[1, 6])
    assert t["registers"].shape == (2, 4, 64) and t["cls"].shape == (2, 1, 64)
    info = json.loads((tmp_path / "features.json").read_text())
    assert TokenLayout.from_dict(info["layout"]) == TokenLayout(1, 4, 4, 4, 64)
    assert info["image_encoder"]["name"] == "dinov2_reg" and res["n_samples"] == 2
    with pytest.raises(ValueError, match="tokens have shape"):
        gen.generate(torch.randn(1, 20, 64), tmp_path, "p")


# ------------------------------------------------------------------------------ TRELLIS


class FakeTrellisPipeline:
    """Records the calls our adapter makes, with the signatures of TRELLIS's stages."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def sample_sparse_structure(self, cond, num_samples=1, sampler_params={}):  # noqa: B006
        self.calls.append(("ss", cond, num_samples, sampler_params))
        return torch.zeros(7, 4, dtype=torch.int32)

    def sample_slat(self, cond, coords, sampler_params={}):  # noqa: B006
        self.calls.append(("slat", cond, coords, sampler_params))
        return "slat"

    def decode_slat(self, slat, formats=("mesh", "gaussian", "radiance_field")):
        self.calls.append(("decode", slat, list(formats)))
        return {f: [f"{f}-0"] for f in formats}


def test_trellis_adapter_feeds_tokens_as_the_image_condition(setup, tmp_path):
    cfg = setup.cfg("generator.ss_steps=12", "generator.slat_cfg=3.0")
    pipe = FakeTrellisPipeline()
    exported = []
    gen = TrellisGenerator(
        TRELLIS_LAYOUT,
        cfg.generator,
        seed=3,
        pipeline=pipe,
        export_glb=lambda out, path: exported.append((out, path)),
    )
    tokens = torch.nn.functional.layer_norm(torch.randn(2, 1374, 1024), (1024,)).half()
    res = gen.generate(tokens, tmp_path, "a chair")
    ss = [c for c in pipe.calls if c[0] == "ss"]
    slat = [c for c in pipe.calls if c[0] == "slat"]
    assert len(ss) == len(slat) == 2  # one run per generated token grid
    for i, (_, cond, n, params) in enumerate(ss):
        assert set(cond) == {"cond", "neg_cond"} and n == 1
        assert cond["cond"].dtype == torch.float32 and cond["cond"].shape == (1, 1374, 1024)
        assert torch.equal(cond["cond"], tokens[i : i + 1].float())  # no normalisation
        assert torch.count_nonzero(cond["neg_cond"]) == 0
        assert cond["neg_cond"].shape == cond["cond"].shape
        assert params == {"steps": 12, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0]}
        assert slat[i][1] is cond and slat[i][3]["cfg_strength"] == 3.0
    assert all(c[2] == ["mesh", "gaussian"] for c in pipe.calls if c[0] == "decode")
    assert [p.name for _, p in exported] == ["sample_0.glb", "sample_1.glb"]
    assert res["files"] == ["sample_0.glb", "sample_1.glb"] and res["warning"] is None


def test_trellis_contract_refuses_other_layouts_and_explains_install(setup):
    cfg = setup.cfg()
    manifest = FeatureStore.open(setup.store_path).manifest  # tiny DINOv2: 4x4 grid, 64 ch
    with pytest.raises(ValueError, match="1374"):
        build_generator(cfg, manifest, name="trellis")
    with pytest.raises(ValueError, match="DINOv2-reg"):
        check_trellis_contract(TRELLIS_LAYOUT, {"name": "efficientnet_lite0"})
    gen = TrellisGenerator(TRELLIS_LAYOUT, cfg.generator, pipeline=FakeTrellisPipeline())
    with pytest.raises(ValueError, match="tokens have shape"):
        gen.generate(torch.randn(1, 1374, 768), Path("."), "p")
    if not torch.cuda.is_available():
        lazy = TrellisGenerator(TRELLIS_LAYOUT, cfg.generator)
        with pytest.raises(RuntimeError, match="CUDA") as e:
            _ = lazy.pipeline
        assert "git clone" in str(e.value) and INSTALL_HELP in str(e.value)


@pytest.mark.gpu
def test_trellis_real_pipeline_with_its_own_image_tokens(tmp_path):
    """Real TRELLIS-image-large: tokens from TRELLIS's own DINOv2 branch through our adapter."""
    pytest.importorskip("trellis.pipelines")
    from PIL import Image
    from skimage import data

    from gap3d.config import load_config
    from gap3d.inference.generators.trellis import _load_pipeline, _render_previews

    cfg = load_config("paper", ["generator.ss_steps=5", "generator.slat_steps=5"])
    pipe = _load_pipeline(cfg.generator.trellis_model)
    image = pipe.preprocess_image(Image.fromarray(data.astronaut()))
    tokens = pipe.get_cond([image])["cond"]
    assert tuple(tokens.shape) == (1, TRELLIS_LAYOUT.n_tokens, TRELLIS_LAYOUT.channels)
    gen = TrellisGenerator(
        TRELLIS_LAYOUT,
        cfg.generator,
        pipeline=pipe,
        render_previews=_render_previews,
        device="cuda",
    )
    res = gen.generate(tokens.float().cpu(), tmp_path, "astronaut")
    assert (tmp_path / "sample_0.glb").stat().st_size > 1000
    assert res["warning"] is None
    assert all((tmp_path / p).stat().st_size > 0 for p in res["samples"][0]["previews"])
