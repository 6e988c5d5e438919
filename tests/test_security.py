"""Nothing from a config, a file name or a results file runs code."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from conftest import REPO

from snakembed.heads import load_head, save_head
from snakembed.heads.linear import LinearHead


def _sources():
    for folder in ("snakembed", "scripts", "workflow"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".smk"):
                yield path
    yield REPO / "Snakefile"


@pytest.mark.parametrize(
    "pattern",
    [
        r"(?<![.\w])eval\(",
        r"(?<![.\w])exec\(",
        r"os\.system\(",
        r"shell\s*=\s*True",
        r"^\s*(shell|run):",
    ],
)
def test_no_code_path_reaches_a_shell_or_eval(pattern):
    """Rules run scripts, never shell commands; the library never evaluates strings."""
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in _sources()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert hits == []


def test_a_head_file_cannot_import_a_foreign_module(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_head.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\nclass Head:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "head.npz"
    save_head(LinearHead(np.eye(2), np.zeros(2), ["a", "b"]), path)
    with np.load(path) as data:
        arrays = dict(data)
    arrays["__class__"] = np.asarray("evil_head:Head")
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="refusing to import"):
        load_head(path)
    assert not marker.exists() and "evil_head" not in sys.modules


def test_a_head_file_that_is_not_one_names_itself(tmp_path):
    path = tmp_path / "head.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="head.npz is not a snakembed head file.*delete"):
        load_head(path)
