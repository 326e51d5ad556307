"""Which cached prompts are text+image, and with which picture (``data.image_prompt_fraction``).

The paper's prompts may carry an image; gap3d trains on some multimodal prompts instead of
leaving them zero-shot. For a share ``data.image_prompt_fraction`` of the samples the cache
stores the prompt latents of ``caption + an image``: the sample's own picture
(``data.image_prompt_source: self``) or another view of the same object from the same shard
(``other_view``; views are grouped by the sample metadata key ``data.image_prompt_group``,
``asset_id`` in the demo), so that the aligner cannot learn to copy the target picture.

Everything here is a pure function of the decoded samples and the policy:

* whether a sample gets an image is decided by a hash of ``(seed, key, url)`` against the
  fraction (stable across runs, workers and shard orders);
* the other view is the candidate with the smallest hash of ``(seed, key, candidate key)``.

The policy is recorded in the store manifest (``extra["image_prompts"]``, written when the
store is created) and the encode tasks read it from there, so a store's rows all follow the
one policy its manifest states. Each row's ``meta`` records what it got: ``prompt_modality``
(``text`` / ``text+image``), ``prompt_image`` (``self`` / ``view:<key>``) and, when a chosen
image could not be used, ``prompt_image_dropped`` with the reason. A text+image prompt whose
image tokens would not survive the cache's ``max_length`` truncation (which keeps the last
tokens) falls back to text only rather than storing half an image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gap3d.encoders.base import PromptBatch, PromptEncoder, pack_rows
from gap3d.encoders.image_input import flatten_alpha

MANIFEST_KEY = "image_prompts"
SOURCES = ("self", "other_view")


@dataclass(frozen=True)
class PromptPolicy:
    """How the cache picks text+image prompts (see the module docstring)."""

    fraction: float = 0.0
    source: str = "self"
    group_key: str = "asset_id"
    seed: int = 0
    # the store's alpha policy: a prompt picture with transparency is flattened like the
    # image encoder flattens its input in the reference mode
    alpha_background: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"image prompt fraction must be in [0, 1], got {self.fraction}")
        if self.source not in SOURCES:
            raise ValueError(f"image prompt source must be one of {SOURCES}, got {self.source!r}")

    @property
    def active(self) -> bool:
        return self.fraction > 0

    @classmethod
    def from_config(cls, cfg: Any) -> PromptPolicy:
        d = cfg.data
        return cls(
            fraction=float(d.image_prompt_fraction),
            source=d.image_prompt_source,
            group_key=d.image_prompt_group,
            seed=int(cfg.seed),
            alpha_background=tuple(cfg.image_encoder.alpha_background),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alpha_background"] = list(self.alpha_background)
        return d

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> PromptPolicy:
        """The policy a store was created with (none recorded: text prompts only)."""
        d = (manifest.get("extra") or {}).get(MANIFEST_KEY)
        if not d:
            return cls()
        d = dict(d)
        d["alpha_background"] = tuple(d.get("alpha_background", (0, 0, 0)))
        return cls(**d)


def manifest_extra(cfg: Any) -> dict[str, Any]:
    """``StoreSpec.extra`` entries for the config's policy (nothing when inactive)."""
    policy = PromptPolicy.from_config(cfg)
    return {MANIFEST_KEY: policy.to_dict()} if policy.active else {}


def _unit(*parts: object) -> float:
    """A number in [0, 1) that is a pure function of ``parts``."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def wants_image(policy: PromptPolicy, key: str, url: str) -> bool:
    """Whether the sample ``(key, url)`` gets a text+image prompt under ``policy``."""
    return policy.active and _unit(policy.seed, "image-prompt", key, url) < policy.fraction


def choose_prompt_images(samples: Sequence[Any], policy: PromptPolicy) -> list[tuple[Any, str]]:
    """Per sample ``(image or None, note)``: the picture of its prompt and where it came from
    (``self``, ``view:<key>``, or why none: ``""`` when text was chosen).

    ``samples`` are the decoded samples of one shard (``key``, ``url``, ``meta``, ``image``,
    ``valid``); invalid samples never get or give an image.
    """
    groups: dict[Any, list[Any]] = {}
    if policy.source == "other_view":
        for s in samples:
            g = s.meta.get(policy.group_key) if s.valid else None
            if g is not None:
                groups.setdefault(g, []).append(s)
    out: list[tuple[Any, str]] = []
    for s in samples:
        if not s.valid or not wants_image(policy, s.key, s.url):
            out.append((None, ""))
            continue
        if policy.source == "self":
            out.append((s.image, "self"))
            continue
        group = s.meta.get(policy.group_key)
        others = [o for o in groups.get(group, []) if o.key != s.key and o.url != s.url]
        if not others:
            out.append((None, f"no other view with {policy.group_key}={group!r} in the shard"))
            continue
        pick = min(others, key=lambda o: _unit(policy.seed, "view", s.key, o.key))
        out.append((pick.image, f"view:{pick.key}"))
    return out


def assign_prompt_images(samples: Sequence[Any], policy: PromptPolicy) -> None:
    """Set ``prompt_image`` (flattened RGB or None) and the ``meta`` notes of each sample."""
    if not policy.active:
        return
    for s, (image, note) in zip(samples, choose_prompt_images(samples, policy), strict=True):
        s.prompt_image = None
        if not s.valid:
            continue
        s.meta["prompt_modality"] = "text"
        if image is not None:
            s.prompt_image = flatten_alpha(image, policy.alpha_background)
            s.meta["prompt_modality"] = "text+image"
            s.meta["prompt_image"] = note
        elif note:
            s.meta["prompt_image_dropped"] = note


def encode_prompts(encoder: PromptEncoder, samples: Sequence[Any]) -> PromptBatch:
    """Prompt latents of ``samples`` padded to ``encoder.max_length``: text, or text + the
    sample's ``prompt_image`` (set by :func:`assign_prompt_images`).

    Without a policy (no ``prompt_modality`` in the samples' meta) this is exactly
    ``encoder.encode(captions, pad_to_max=True)``; with one, every row also records its
    untruncated length in ``meta["prompt_tokens"]``.
    """
    captions = [s.caption for s in samples]
    images = [getattr(s, "prompt_image", None) for s in samples]
    if not any("prompt_modality" in s.meta for s in samples):  # no policy: text prompts
        return encoder.encode(captions, pad_to_max=True)
    full = encoder.encode(captions, images=images, pad_to_max=False)
    rows = [full.hidden[i, full.mask[i]] for i in range(len(samples))]
    limit = encoder.max_length + int(getattr(encoder, "image_prefix_tokens", 0))
    # keeping the last max_length states may only cut tokens before the image (system turn)
    too_long = [i for i, im in enumerate(images) if im is not None and rows[i].shape[0] > limit]
    if too_long:
        text = encoder.encode([captions[i] for i in too_long], pad_to_max=False)
        for j, i in enumerate(too_long):
            s = samples[i]
            s.meta["prompt_modality"] = "text"
            s.meta.pop("prompt_image", None)
            s.meta["prompt_image_dropped"] = (
                f"the text+image prompt has {rows[i].shape[0]} states; its image would not fit "
                f"prompt_encoder.max_length={encoder.max_length} (lower "
                "prompt_encoder.image_max_pixels or raise max_length)"
            )
            rows[i] = text.hidden[j, text.mask[j]]
    for s, r in zip(samples, rows, strict=True):
        s.meta["prompt_tokens"] = int(r.shape[0])
    return pack_rows([torch.as_tensor(r) for r in rows], encoder.max_length, pad_to_max=True)
