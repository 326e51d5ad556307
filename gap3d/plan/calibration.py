"""The calibration file ``gap3d bench`` writes and ``gap3d plan`` reads.

One JSON document (``FORMAT``, ``VERSION``) with the machine and package versions it was
measured with, the config it was measured for, and sections ``encode``, ``store``, ``train``
(see ``gap3d/plan/bench.py`` for what each figure is). Every figure is a measurement on the
machine named in ``machine``; a plan says so wherever it uses one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT = "gap3d-calibration"
VERSION = 1
FILENAME = "calibration.json"


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message says why."""


def default_path(cfg: Any) -> Path:
    """Where ``gap3d bench`` writes by default: ``<workdir>/calibration.json``."""
    return Path(cfg.work) / FILENAME


def save(cal: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cal, indent=1, sort_keys=False, default=str))
    tmp.replace(path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a calibration file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(
            f"calibration file {path} not found; write one with `gap3d bench --config ...`"
        )
    try:
        cal = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path} is not valid JSON ({e}); re-run `gap3d bench`") from e
    if not isinstance(cal, dict) or cal.get("format") != FORMAT:
        raise CalibrationError(f"{path} is not a gap3d calibration (format != {FORMAT!r})")
    if cal.get("version") != VERSION:
        raise CalibrationError(
            f"{path} has calibration version {cal.get('version')!r}; this gap3d reads "
            f"version {VERSION}. Re-run `gap3d bench`"
        )
    cal["path"] = str(path)
    return cal


def device_label(cal: dict[str, Any]) -> str:
    """``"cpu (AMD EPYC, 2 cores)"`` / ``"cuda (NVIDIA H100 80GB HBM3)"`` of a calibration."""
    d = cal.get("device", {})
    if d.get("kind") == "cuda":
        return f"cuda ({d.get('name', '?')})"
    m = cal.get("machine", {})
    return f"cpu ({m.get('cpu_model', '?')}, {m.get('cores', '?')} cores)"
