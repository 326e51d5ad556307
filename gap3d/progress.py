"""Progress that a person sees, on a terminal and in a log file.

On a terminal (stdout is a TTY) long loops show a tqdm bar. When stdout is redirected
(``make demo > log``, CI, a batch job) a bar would write nothing useful to the log (it goes
to stderr, redrawn with carriage returns), so :class:`Progress` prints a plain line instead
every ``GAP3D_PROGRESS_S`` seconds (default 15) and once at the end::

    train regressor baseline: 120/300 step (40%) 2.1 step/s, ETA 86 s, loss 0.412

The same decision (:func:`plain_output`) switches the Lightning trainer between its bar and
the text callback in ``gap3d.trainer.progress``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

DEFAULT_INTERVAL_S = 15.0


def plain_output() -> bool:
    """True when stdout is not a terminal (progress goes to the log as plain lines).

    ``GAP3D_PROGRESS=plain`` or ``=bar`` forces either way.
    """
    forced = os.environ.get("GAP3D_PROGRESS", "").lower()
    if forced in ("plain", "bar"):
        return forced == "plain"
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):  # closed or replaced stdout
        return True


def interval_s() -> float:
    """Seconds between plain progress lines (``GAP3D_PROGRESS_S``)."""
    try:
        return max(0.0, float(os.environ.get("GAP3D_PROGRESS_S", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN / unknown
        return "?"
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 90:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def progress_line(
    desc: str, done: int, total: int | None, unit: str, elapsed: float, **postfix: Any
) -> str:
    """``desc: done/total unit (pct) rate unit/s, ETA ..., key value ...``"""
    rate = done / elapsed if elapsed > 0 else float("nan")
    parts = [f"{desc}: {done}" + (f"/{total}" if total else "") + f" {unit}"]
    if total:
        parts[0] += f" ({100.0 * done / total:.0f}%)"
    parts.append(f"{rate:.2f} {unit}/s" if rate == rate else f"? {unit}/s")
    if total and done < total and rate > 0:
        parts.append(f"ETA {format_eta((total - done) / rate)}")
    elif total and done >= total:
        parts.append(f"done in {format_eta(elapsed)}")
    for k, v in postfix.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


class Progress:
    """A tqdm bar on a terminal, periodic plain lines on stdout otherwise.

    Use as a context manager; ``update(n, **postfix)`` advances by ``n`` and records the latest
    values (e.g. ``loss=0.41``) shown with the next line.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        plain: bool | None = None,
        every_s: float | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.plain = plain_output() if plain is None else plain
        self.every_s = interval_s() if every_s is None else every_s
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._closed = False
        self._bar = (
            None if self.plain else tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(
                    {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                    refresh=False,
                )
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s and (self.total is None or self.done < self.total):
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        line = progress_line(
            self.desc, self.done, self.total, self.unit, now - self.t0, **self.postfix
        )
        print(line, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.done:
            self._print(time.perf_counter())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
