"""``gap3d generate --prompts FILE``: many prompts, models loaded once, one folder each.

``FILE`` is either plain text (one prompt per line; blank lines and lines starting with ``#``
are skipped) or a CSV with a header naming a ``prompt`` column and optionally ``image`` (a
path, relative to the CSV's folder) and ``seed`` (an integer; empty = ``sample.seed``).

Every prompt goes through the same per-prompt function as ``gap3d generate --prompt``
(:meth:`GenerateSession.run`) into ``<out>/<NNN>-<slug>/``. Afterwards ``<out>/results.csv``
and ``<out>/results.md`` (a table with each prompt's preview render and PCA map) summarise
the batch. A prompt that fails is recorded with its error and the batch goes on; a prompt
whose folder already holds a result for the same prompt, image and settings is reused, so
re-running an interrupted batch only does the rest.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gap3d.progress import Progress

__all__ = ["PromptJob", "read_prompt_file", "run_batch", "write_summary"]

CSV_COLUMNS = (
    "index",
    "prompt",
    "image",
    "seed",
    "status",
    "error",
    "folder",
    "best_asset",
    "shape",
    "colour",
    "score",
    "seconds",
)


@dataclass
class PromptJob:
    """One row of a prompt file."""

    index: int
    prompt: str
    image: str | None = None
    seed: int | None = None
    line: int = 0  # line in the file (for messages)


def _is_csv(path: Path, first: str) -> bool:
    if path.suffix.lower() in (".csv", ".tsv"):
        return True
    header = [h.strip().lower() for h in first.split(",")]
    return "prompt" in header and len(header) > 1


def read_prompt_file(path: str | Path) -> list[PromptJob]:
    """Parse a prompt file (text or CSV, see the module docstring); raise on bad input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({e})") from e
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    jobs: list[PromptJob] = []
    if _is_csv(path, first):
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(
            (ln for ln in lines if not ln.lstrip().startswith("#")), delimiter=delim
        )
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "prompt" not in fields:
            raise ValueError(
                f"--prompts {path}: a CSV needs a 'prompt' column (found: {', '.join(fields)})"
            )
        unknown = sorted(set(fields) - {"prompt", "image", "seed"})
        if unknown:
            raise ValueError(
                f"--prompts {path}: unknown column(s) {unknown}; use prompt, image, seed"
            )
        for n, raw in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            if not row.get("prompt"):
                if any(row.values()):
                    raise ValueError(f"--prompts {path}:{n}: empty prompt")
                continue
            seed: int | None = None
            if row.get("seed"):
                try:
                    seed = int(row["seed"])
                except ValueError:
                    raise ValueError(
                        f"--prompts {path}:{n}: seed {row['seed']!r} is not an integer"
                    ) from None
            image = row.get("image") or None
            if image is not None and not Path(image).is_absolute():
                image = str(path.parent / image)
            jobs.append(PromptJob(len(jobs), row["prompt"], image, seed, n))
    else:
        for n, ln in enumerate(lines, start=1):
            s = ln.strip()
            if s and not s.startswith("#"):
                jobs.append(PromptJob(len(jobs), s, None, None, n))
    if not jobs:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    missing = [f"line {j.line}: {j.image}" for j in jobs if j.image and not Path(j.image).is_file()]
    if missing:
        raise FileNotFoundError(f"--prompts {path}: image file(s) not found: " + "; ".join(missing))
    return jobs


@contextmanager
def _seed(session: Any, seed: int | None) -> Iterator[None]:
    """Run one prompt with its own ``sample.seed`` (restored afterwards)."""
    if seed is None:
        yield
        return
    old = session.cfg.sample
    session.cfg.sample = dataclasses.replace(old, seed=seed)
    try:
        yield
    finally:
        session.cfg.sample = old


def _folder(job: PromptJob) -> str:
    from gap3d.inference.generate import _slug

    return f"{job.index:03d}-{_slug(job.prompt, 40)}"


MARKER = ".batch.json"  # what produced a folder's result (prompt, image, settings, aligner)


def _identity(session: Any, job: PromptJob, settings: dict[str, Any]) -> dict[str, Any]:
    weights = Path(session.aligner_dir) / "aligner.safetensors"
    st = weights.stat() if weights.exists() else None
    return {
        "prompt": job.prompt,
        "image": job.image,
        "settings": settings,
        "generator": session.generator_name,
        "aligner": str(session.aligner_dir),
        "aligner_weights": [st.st_size, st.st_mtime_ns] if st else None,
    }


def _reusable(folder: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's result if it was made for exactly this prompt, image, settings and
    aligner (a retrained aligner or a changed setting makes it stale)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        old = json.loads((folder / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return old if marker == json.loads(json.dumps(ident)) else None


def _row(job: PromptJob, status: str, folder: str, result: dict[str, Any] | None, err: str = ""):
    best = (result or {}).get("best") or {}
    return {
        "index": job.index,
        "prompt": job.prompt,
        "image": job.image or "",
        "seed": (result or {})
        .get("settings", {})
        .get("seed", "" if job.seed is None else job.seed),
        "status": status,
        "error": err,
        "folder": folder,
        "best_asset": best.get("asset_id", ""),
        "shape": best.get("shape", ""),
        "colour": best.get("colour", ""),
        "score": f"{best['score']:.4f}" if isinstance(best.get("score"), float) else "",
        "seconds": f"{(result or {}).get('timings_s', {}).get('total', 0.0):.2f}",
        "_files": (result or {}).get("files", []),
    }


def run_batch(session: Any, jobs: list[PromptJob], out_dir: str | Path) -> list[dict[str, Any]]:
    """Generate every job into ``out_dir/<NNN>-<slug>/``; return one summary row per job."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(j.image for j in jobs):
        session.check_image_prompt(next(j.image for j in jobs if j.image))
    s = session.cfg.sample
    rows: list[dict[str, Any]] = []
    with Progress(len(jobs), "generate prompts", unit="prompt") as bar:
        for job in jobs:
            folder = _folder(job)
            settings = {
                "steps": s.steps,
                "cfg_scale": s.cfg_scale,
                "seed": s.seed if job.seed is None else job.seed,
                "n_samples": s.n_samples,
                "device": session.device,
            }
            ident = _identity(session, job, settings)
            old = _reusable(out_dir / folder, ident)
            if old is not None:
                rows.append(_row(job, "reused", folder, old))
            else:
                try:
                    (out_dir / folder / MARKER).unlink(missing_ok=True)
                    with _seed(session, job.seed):
                        res = session.run(job.prompt, job.image, out_dir / folder)
                    (out_dir / folder / MARKER).write_text(json.dumps(ident))
                    rows.append(_row(job, "ok", folder, res.result))
                except (ValueError, RuntimeError, OSError) as e:
                    rows.append(_row(job, "failed", folder, None, f"{type(e).__name__}: {e}"))
            bar.update(1, failed=sum(r["status"] == "failed" for r in rows))
    write_summary(out_dir, rows)
    return rows


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_summary(out_dir: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``results.csv`` (one row per prompt) and ``results.md`` (with preview images)."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    n_ok = sum(r["status"] in ("ok", "reused") for r in rows)
    lines = [
        "# gap3d generate — batch results",
        "",
        f"{len(rows)} prompts, {n_ok} generated, {len(rows) - n_ok} failed "
        f"({time.strftime('%Y-%m-%d %H:%M')}). One folder per prompt; tokens, PCA map and "
        "result.json in each.",
        "",
        "| # | prompt | result | preview | PCA of the tokens |",
        "|---:|---|---|---|---|",
    ]
    for r in rows:
        files = r.get("_files") or []
        preview = next((f for f in files if f.startswith("preview_")), None)
        folder = r["folder"]
        if r["status"] == "failed":
            result = f"**failed**: {_md_cell(r['error'])}"
        elif r["best_asset"]:
            desc = ", ".join(x for x in (r["shape"], r["colour"]) if x)
            result = f"`{r['best_asset']}`" + (f" ({desc})" if desc else "")
            if r["score"]:
                result += f", score {r['score']}"
        else:
            result = "tokens only"
        prompt = _md_cell(r["prompt"]) + (
            f" + image `{Path(r['image']).name}`" if r["image"] else ""
        )
        img = f"![preview]({folder}/{preview})" if preview else ""
        pca = f"![pca]({folder}/pca.png)" if "pca.png" in files else ""
        lines.append(
            f"| {r['index']} | [{prompt}]({folder}/result.json) | {result} | {img} | {pca} |"
        )
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path
