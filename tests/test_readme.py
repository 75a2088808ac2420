"""Every runnable README block runs as written: the README cannot drift from the code.

The ```python and ```bash fenced blocks are extracted in order and run in one fresh working
folder, so later blocks see what earlier ones wrote (the quickstart's ``runs/sweep``, the
exported ``bundles/demo``), as they would for a reader following the README:

- ```python blocks run in this process, each as a fresh ``__main__`` script in that folder;
- ```bash blocks run in ``bash -e`` in that folder (the installed ``deepinsert`` command).

What is not run, and why (nothing else is changed):

- a block right after ``<!-- readme-test: skip (REASON) -->`` is skipped with REASON (it needs a
  real checkpoint, a GPU or a long-running server, installs, or runs the suite itself); the
  skipped blocks are listed in the pytest summary (``-rs``);
- ``pip install ...`` commands (a line, or a ``&&`` segment): CI installs the project first;
- the quickstart's main job reads ``configs/demo.yaml`` relative to the working folder; here that
  file is a reduced copy of the shipped one (48 training / 32 held-out prompts, 512 timesteps,
  checkpoints every 256) so the whole file runs in well under a minute; the command is unchanged.
  The README says so in a ``<!-- readme-test: reduced (...) -->`` note before the block.

No block's output is compared with the README's numbers (the demo model may be rebuilt); a
block passes when it runs without an error.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOTE = re.compile(r"^<!--\s*readme-test:\s*(\w+)\s*(?:\((.*)\))?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # README line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, for blocks marked skip

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """The ```python / ```bash blocks of ``text`` with their skip notes."""
    lines = text.splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if lang in ("python", "bash"):
            note = None
            b = start - 1
            while b >= 0 and not lines[b].strip():
                b -= 1
            if b >= 0:
                note = _NOTE.match(lines[b].strip())
            skip = None
            if note and note.group(1) == "skip":
                skip = note.group(2) or "marked skip"
            out.append(Block(start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n", skip))
        i = j + 1
    return out


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def without_installs(code: str) -> str:
    """Drop ``pip install`` commands: whole lines, or segments of an ``&&`` chain."""
    kept = []
    for line in code.splitlines():
        parts = [p for p in line.split("&&") if not p.strip().startswith("pip install")]
        if parts:
            kept.append("&&".join(parts).strip())
    return "\n".join(kept) + "\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    cfg.update(total_timesteps=512, n_envs=16, checkpoint_every=256)
    cfg["data"].update(max_train_samples=48, max_eval_samples=32)
    (d / "configs").mkdir()
    (d / "configs" / "demo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return d


def test_readme_has_runnable_blocks():
    run = [b for b in BLOCKS if b.skip is None]
    assert sum(b.lang == "python" for b in run) >= 4 and sum(b.lang == "bash" for b in run) >= 2
    assert all(b.skip.strip() for b in BLOCKS if b.skip is not None)  # every skip says why


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, workdir: Path, monkeypatch):
    if block.skip is not None:
        pytest.skip(f"README line {block.line}: {block.skip}")
    env = {**os.environ, "DEEPINSERT_CACHE": str(workdir / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    monkeypatch.setenv("DEEPINSERT_CACHE", env["DEEPINSERT_CACHE"])
    if block.lang == "bash":
        code = without_installs(block.code)
        exe = shutil.which("deepinsert")
        assert exe is not None, "the deepinsert command is not installed"
        r = subprocess.run(["bash", "-e", "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"README line {block.line} failed:\n{code}\n--- stderr\n{r.stderr[-3000:]}"
        return
    script = workdir / f"readme_L{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", [str(script)])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except Exception as e:  # name the README line, keep the traceback
        raise AssertionError(f"README line {block.line} ({block.lang}) raised {type(e).__name__}: {e}") from e
