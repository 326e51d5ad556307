"""Config hygiene (issue 10, item 7): intervals, `base:` cycles, and comments that cite only
documents the repository contains."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from gap3d.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "key", ["train.val_every_n_steps", "train.checkpoint_every_n_steps", "train.log_every_n_steps"]
)
@pytest.mark.parametrize("value", [0, -5])
def test_zero_or_negative_intervals_fail_at_load_time(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' must be > 0, got {value}"):
        load_config("tiny", [f"{key}={value}"])


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text(f"base: {b}\ntrain:\n  max_steps: 7\n")
    b.write_text(f"base: {c}\n")
    c.write_text(f"base: {a}\n")
    with pytest.raises(
        ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"
    ):
        load_config(str(a))
    # a chain without a cycle still loads, and a preset may be reached twice on separate paths
    c.write_text("base: tiny\n")
    assert load_config(str(a)).train.max_steps == 7


# A document reference: a path ending in .md (README.md, docs/ARCHITECTURE.md).
_DOC_REF = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")


def _comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring (other strings are not citations)."""
    source = path.read_text()
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    return out


def test_code_cites_only_documents_inside_the_repository() -> None:
    missing = []
    for folder in ("gap3d", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, text in _comments_and_docstrings(path):
                # ``literals`` name files the code writes (``metrics.md``), not sources
                for ref in _DOC_REF.findall(re.sub(r"``[^`]*``", "", text)):
                    candidates = [ROOT / ref, ROOT / "docs" / ref, path.parent / ref]
                    if not any(c.is_file() for c in candidates):
                        missing.append(f"{path.relative_to(ROOT)}:{n}: {ref}")
    assert not missing, "comments cite documents the repository does not contain:\n" + "\n".join(
        missing
    )
