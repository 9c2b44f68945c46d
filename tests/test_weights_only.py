"""Every ``torch.load`` in ``ml/`` passes ``weights_only=True``: no checkpoint can run code when loaded.

The check parses each ``ml/**/*.py`` with :mod:`ast`, so calls split over several lines, aliases
(``import torch as t``, ``from torch import load``, ``torch.serialization.load``) and keyword
values other than the literal ``True`` (a variable, ``**kwargs``) are all seen.
"""

import ast
from pathlib import Path

import pytest

import ml

ML_ROOT = Path(ml.__file__).resolve().parent
LOADERS = {"torch.load", "torch.serialization.load"}


def _qualified_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, for every ``import torch[...] [as x]`` and ``from torch... import``."""
    names: dict[str, str] = {"torch": "torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch" or alias.name.startswith("torch."):
                    if alias.asname:
                        names[alias.asname] = alias.name
                    else:
                        names[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, names: dict[str, str]) -> str | None:
    """``torch.serialization.load`` for ``t.serialization.load`` when ``t`` is torch; else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return ".".join([names[node.id], *reversed(parts)])


def _is_weights_only(call: ast.Call) -> bool:
    return any(
        kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """``file:line`` of every ``torch.load`` call in ``source`` without ``weights_only=True``."""
    tree = ast.parse(source, filename=filename)
    names = _qualified_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func, names) in LOADERS and not _is_weights_only(node):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}")
    return found


def test_every_torch_load_in_ml_passes_weights_only_true() -> None:
    """Proves no ``torch.load`` call in any ``ml/`` module can unpickle arbitrary objects: each one
    passes the literal ``weights_only=True``."""
    sources = sorted(ML_ROOT.rglob("*.py"))
    assert len(sources) > 20  # the package was found
    found = [line for path in sources for line in unsafe_loads(path.read_text(), str(path))]
    assert found == [], "torch.load without weights_only=True:\n" + "\n".join(found)


def test_ml_does_load_checkpoints_with_torch_load() -> None:
    """Proves the scan is not vacuous: ``ml/`` does call ``torch.load`` (and this test sees it)."""
    calls = 0
    for path in ML_ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = _qualified_names(tree)
        calls += sum(
            isinstance(node, ast.Call) and _dotted(node.func, names) in LOADERS for node in ast.walk(tree)
        )
    assert calls >= 1


@pytest.mark.parametrize(
    ("source", "unsafe"),
    [
        ("import torch\ntorch.load(p, weights_only=True)\n", 0),
        ("import torch\ntorch.load(p)\n", 1),
        ("import torch\ntorch.load(\n    p,\n    map_location='cpu',\n)\n", 1),
        ("import torch\ntorch.load(\n    p,\n    weights_only=True,\n)\n", 0),
        ("import torch\ntorch.load(p, weights_only=False)\n", 1),
        ("import torch\ntorch.load(p, weights_only=safe)\n", 1),
        ("import torch\ntorch.load(p, **kwargs)\n", 1),
        ("import torch as t\nt.load(p)\n", 1),
        ("from torch import load\nload(p)\n", 1),
        ("from torch import load as read\nread(p, weights_only=True)\nread(p)\n", 1),
        ("import torch.serialization\ntorch.serialization.load(p)\n", 1),
        ("from torch.serialization import load\nload(p)\n", 1),
        ("import json\njson.load(f)\nnp.load(f)\n", 0),
    ],
)
def test_the_scan_finds_unsafe_calls(source: str, unsafe: int) -> None:
    """Proves the scan flags each way of calling ``torch.load`` without ``weights_only=True``
    (multi-line, aliased, ``False``, a variable, ``**kwargs``) and nothing else."""
    assert len(unsafe_loads(source)) == unsafe
