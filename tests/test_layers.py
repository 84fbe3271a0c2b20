"""The plan of the house (docs/architecture.md): imports only run down the layers, and nothing in
the product knows the testbed or the experiment drivers. Every import counts, also those inside
functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

# From the ground up. A module may import its own layer and the ones below it, never above.
LAYERS = [
    ("util", ["train.util"]),
    ("data and models", ["data.config", "data.datasets", "data.shapes", "train.models", "train.sscd"]),
    ("monitor and mitigations", ["train.monitor", "train.mitigate"]),
    ("evaluation and checkpoints", ["train.evaluate", "train.checkpoint"]),
    ("the loop", ["train.config", "train.tracking", "train.finetune"]),
    ("the audit", ["train.audit"]),
    ("experiments", ["data.testbed", "launch"]),
]
HARNESS = ("data.testbed", "launch")
PACKAGES = ("train", "data", "launch")


def layer_of(module: str) -> int:
    if module in ("train", "data"):  # the packages' own __init__ files hold nothing
        return 0
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        found += [(n, node.lineno) for n in names if n.split(".")[0] in PACKAGES]
    return found


def project_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def violations(modules: list[Path]) -> list[str]:
    out = []
    for path in modules:
        me = module_name(path)
        mine = layer_of(me)
        for imported, line in imports_of(path):
            where = f"{path.relative_to(REPO)}:{line} imports {imported}"
            theirs = layer_of(imported)
            if theirs > mine:
                out.append(f"{where}: layer '{LAYERS[theirs][0]}' is above '{LAYERS[mine][0]}'")
            elif me.startswith("data.testbed") and not (imported.startswith("data.testbed") or imported == "train.util"):
                out.append(f"{where}: the testbed builder may import only itself and train.util")
            elif not me.startswith(HARNESS) and imported.startswith(HARNESS):
                out.append(f"{where}: the product must not know the testbed or the experiment drivers")
    return out


def test_every_project_module_has_a_layer():
    unknown = []
    for path in project_modules():
        for name in [module_name(path)] + [m for m, _ in imports_of(path)]:
            try:
                layer_of(name)
            except KeyError:
                unknown.append(f"{path.relative_to(REPO)}: {name}")
    assert not unknown, "modules missing from LAYERS (add them where they belong):\n" + "\n".join(unknown)


def test_imports_run_down_the_layers_and_the_product_never_imports_the_harness():
    found = violations(project_modules())
    assert not found, "\n".join(found)


@pytest.mark.parametrize("where, source, expected", [
    ("train/monitor/bad.py", "from train.finetune import run\n", "is above"),
    ("train/evaluate/bad.py", "def f():\n    import launch.ablate\n", "is above"),
    ("train/mitigate/bad.py", "from data.testbed import build\n", "is above"),
    ("data/testbed/bad.py", "from train.models import load_components\n", "may import only itself"),
    ("train/mitigate/bad.py", "from . import base\nfrom ..monitor import signals\nfrom train.util import seed_of\n", None),
])
def test_the_layering_check_catches_what_it_should(tmp_path, monkeypatch, where, source, expected):
    """The check itself can fail: hand-made modules in an empty copy of the tree."""
    import test_layers as me

    fake = tmp_path / where
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(source)
    monkeypatch.setattr(me, "REPO", tmp_path)
    found = violations([fake])
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found
