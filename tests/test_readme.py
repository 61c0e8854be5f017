"""The README's Python snippets run as they stand, so the README cannot drift from the code.

Every ```python block of README.md is written to a file and run with ``runpy`` (as ``__main__``, the
way a user runs a script: ``snopt_dyn.wrap`` then finds the user's imports in that module).
"""
from __future__ import annotations

import re
import runpy
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets(text: str):
    """``(first line number, code)`` of every ```python block."""
    out = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return out


SNIPPETS = python_snippets(README.read_text())


def test_the_readme_has_a_quickstart_for_every_library():
    code = "\n".join(c for _, c in SNIPPETS)
    for library in ("torchdyn", "torchcde", "torchdiffeq"):
        assert re.search(rf"^(import|from) {library}\b", code, flags=re.M), library
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("line,code", SNIPPETS, ids=[f"README.md:{line}" for line, _ in SNIPPETS])
def test_readme_snippet_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write here
    path = tmp_path / f"readme_line_{line}.py"
    path.write_text(code)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        runpy.run_path(str(path), run_name="__main__")


def test_a_broken_snippet_fails():
    """The runner above can fail: a snippet calling a name that does not exist raises."""
    code = next(c for _, c in SNIPPETS if "snopt_dyn.wrap(" in c)
    broken = code.replace("snopt_dyn.wrap(", "snopt_dyn.wrap_that_does_not_exist(")
    with pytest.raises(AttributeError):
        exec(compile(broken, "<broken README snippet>", "exec"), {"__name__": "__main__"})
