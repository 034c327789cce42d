"""Every ```python block of README.md runs on its own, as a user would paste it.

Each block is written to a file in an empty temporary directory and run there
with this interpreter in a subprocess: the working directory is that
directory, ``PYTHONPATH`` is removed (the repository is not importable, so a
block can't lean on ``examples/`` or ``tests/``), ``JAX_PLATFORMS=cpu``. A
block passes when it exits 0; on failure the test shows its stderr.
Also checked: the README's test command is the one ``.ci/run`` runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

TEST_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test,lint]" '
                "&& python -m pytest -q -n 2")
TIMEOUT_S = 600      # a block takes ~10-20 s of CPU; the limit allows for a loaded machine


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "top"


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """``[(id, code)]`` of every ```python block, the id from the nearest heading above
    it (``-2``, ``-3``... for further blocks under the same heading)."""
    blocks, heading, seen = [], "top", {}
    lang, lines = None, []            # lang: the open fence's language, None outside
    for line in text.splitlines():
        if lang is None:
            if line.startswith("```"):
                lang, lines = line[3:].strip(), []
            elif line.startswith("#"):          # a heading (outside fences only)
                heading = line.lstrip("#").strip()
        elif line.strip() == "```":
            if lang == "python":
                n = seen[heading] = seen.get(heading, 0) + 1
                blocks.append((_slug(heading) + (f"-{n}" if n > 1 else ""), "\n".join(lines)))
            lang = None
        else:
            lines.append(line)
    if lang is not None:
        raise ValueError(f"README.md: a ```{lang} block after {heading!r} is never closed")
    return blocks


with open(README) as fh:
    BLOCKS = readme_blocks(fh.read())


def test_readme_has_blocks():
    assert len(BLOCKS) >= 10, [i for i, _ in BLOCKS]
    assert len({i for i, _ in BLOCKS}) == len(BLOCKS)


def test_readme_test_command_is_what_ci_runs():
    with open(README) as fh:
        text = fh.read()
    assert TEST_COMMAND in text
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        ci = fh.read()
    assert 'pip install -q -e ".[test,lint]"' in ci and "python -m pytest -q -n 2" in ci


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_block_runs(tmp_path, code):
    assert "from examples" not in code and "import examples" not in code, \
        "README blocks must run without the repository on sys.path"
    script = tmp_path / "block.py"
    script.write_text(code + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LORA_JAX_TEST_SEED", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                                  f"\n--- stderr\n{proc.stderr[-6000:]}")
    assert proc.stdout.strip(), "the block printed nothing"
