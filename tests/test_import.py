"""Tests that importing ``ml`` stays cheap: heavy libraries load only when something needs them.

Each check runs in a fresh interpreter, since this test process has long imported torch. Timings
live in ``bench/import_time.py``; here only what gets imported is asserted.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "tensorboard", "gymnasium", "matplotlib", "sklearn")


def _imported_top_level_modules(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {name.partition(".")[0] for name in json.loads(result.stdout.strip().splitlines()[-1])}


def test_import_ml_imports_no_heavy_library() -> None:
    loaded = _imported_top_level_modules("import ml")
    assert "ml" in loaded
    assert sorted(loaded & set(HEAVY)) == []


def test_import_ml_core_and_cli_import_no_heavy_library() -> None:
    loaded = _imported_top_level_modules(
        "import ml.cli, ml.core.config, ml.core.registry, ml.core.state, ml.core.compose"
    )
    assert sorted(loaded & set(HEAVY)) == []


@pytest.mark.parametrize(
    "module", ["ml.trainers.base", "ml.trainers.sl", "ml.trainers.rl", "ml.examples.classic_control"]
)
def test_trainer_modules_import_only_torch(module: str) -> None:
    loaded = _imported_top_level_modules(f"import {module}")
    assert "torch" in loaded  # the trainer needs it; nothing else heavy comes along
    assert sorted(loaded & {"tensorboard", "gymnasium", "matplotlib", "sklearn"}) == []


def test_public_names_are_reachable_lazily() -> None:
    loaded = _imported_top_level_modules("import ml\nassert ml.State.init_state().num_steps == 0")
    assert "torch" not in loaded  # State is plain data: touching it does not load torch
