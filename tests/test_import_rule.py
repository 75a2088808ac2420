"""The import rule of docs/design.md §2, checked by parsing every module's imports (AST).

errors/utils <- frozen_vlm <- env <- policy <- export; router imports none of torch,
transformers, stable-baselines3, frozen_vlm, env, policy, export; generate may import
frozen_vlm and router; demo is imported by nothing but the CLI and the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("errors", "utils", "frozen_vlm", "env", "policy", "export", "router", "generate", "demo", "cli",
         "analysis", "serving", "configs", "finetune")

# part -> the deepinsert parts it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "utils": {"errors"},
    "frozen_vlm": {"errors", "utils"},
    "env": {"errors", "utils", "frozen_vlm"},
    "policy": {"errors", "utils", "frozen_vlm", "env"},
    "export": {"errors", "utils", "frozen_vlm", "env", "policy", "router"},
    "router": {"errors", "utils"},
    "generate": {"errors", "utils", "frozen_vlm", "router"},
    "serving": {"errors", "utils", "frozen_vlm", "router", "generate"},
    "demo": {"errors", "utils", "frozen_vlm", "env"},
    "finetune": {"errors", "utils", "frozen_vlm", "env"},
    "analysis": {"errors", "utils", "frozen_vlm", "env"},
}
# third-party packages a part must never import
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "router": {"torch", "transformers", "stable_baselines3", "onnx", "peft", "gymnasium"},
    "errors": {"torch", "transformers", "numpy"},
}


def _modules() -> list[Path]:
    out = []
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", "build", ".git") or rel.parts[0].startswith("."):
            continue
        out.append(p)
    return out


def _part_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in this project
                out.append(("<relative>", node.lineno))
            elif node.module:
                out.append((node.module, node.lineno))
                if node.module == "deepinsert":  # `from deepinsert import generate` names a part
                    out += [(f"deepinsert.{a.name}", node.lineno) for a in node.names]
    return out


def _violations() -> list[str]:
    bad = []
    for path in _modules():
        part = _part_of(path)
        rel = path.relative_to(ROOT)
        for name, line in _imports(path):
            if name == "<relative>":
                bad.append(f"{rel}:{line}: relative import")
                continue
            top = name.split(".")[0]
            if top in FORBIDDEN_THIRD_PARTY.get(part, set()):
                bad.append(f"{rel}:{line}: {part} must not import {top}")
            if top != "deepinsert" or name == "deepinsert":
                continue
            target = name.split(".")[1]
            if target in ("errors", "__init__") or target == part or target not in PARTS:
                continue
            if part in ALLOWED and target not in ALLOWED[part]:
                bad.append(f"{rel}:{line}: {part} imports {name} ({part} may import {sorted(ALLOWED[part])})")
            if target == "demo" and part not in ("demo", "cli"):
                bad.append(f"{rel}:{line}: only the CLI and the tests import demo, not {part}")
    return bad


def test_the_import_rule_holds() -> None:
    bad = _violations()
    assert not bad, "import rule of docs/design.md §2 broken:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("part", "source", "should_fail"),
    [
        ("frozen_vlm", "from deepinsert.env.problem import reward\n", True),
        ("router", "import torch\n", True),
        ("router", "from deepinsert.frozen_vlm import load_vlm\n", True),
        ("env", "from deepinsert.demo import demo_model_path\n", True),
        ("generate", "from deepinsert.router import Router\nfrom deepinsert.frozen_vlm import load_vlm\n", False),
        ("export", "from deepinsert.policy.run import load_run\n", False),
    ],
)
def test_the_checker_catches_violations(tmp_path, part, source, should_fail) -> None:
    """The checker itself: a planted import is reported (or not) as the rule says."""
    fake_root = tmp_path / "pkg"
    target = fake_root / part / "mod.py" if part != "generate" else fake_root / "generate.py"
    target.parent.mkdir(parents=True)
    target.write_text(source)
    globals()["ROOT"] = fake_root
    try:
        assert bool(_violations()) is should_fail
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parents[1]
