"""The digits example reads scikit-learn's data file itself, without the two seconds of importing sklearn;
a run shorter than its warm-up trains."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from ml.examples.digits import SPLIT_SIZES, _load_digits_split, load_digits_arrays


def test_the_data_read_directly_equals_load_digits() -> None:
    data, target = load_digits_arrays()
    reference = load_digits()
    assert data.shape == (1797, 64) and target.shape == (1797,)
    np.testing.assert_array_equal(data, reference.data)
    np.testing.assert_array_equal(target, reference.target)


def test_the_splits_are_disjoint_and_cover_every_image() -> None:
    splits = _load_digits_split(0)
    assert {phase: len(labels) for phase, (_, labels) in splits.items()} == SPLIT_SIZES
    rows = np.concatenate([images for images, _ in splits.values()])
    assert len(np.unique(rows, axis=0)) == len(np.unique(load_digits_arrays()[0], axis=0))
    assert all(images.dtype == np.float32 and images.max() <= 1.0 for images, _ in splits.values())


def test_loading_the_data_does_not_import_sklearn() -> None:
    code = "import sys; from ml.examples.digits import load_digits_arrays; load_digits_arrays(); "
    code += "print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_short_run_trains_with_its_warmup_clamped(tmp_path: Path) -> None:
    """``ml train digits task.max_steps=60``: digits warms up for 100 steps, longer than the run."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
    }
    env.update(RUN_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    ml = Path(sys.executable).parent / "ml"
    result = subprocess.run(
        [str(ml), "train", "digits", "task.max_steps=60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "lr_scheduler.warmup_steps (100) is not shorter than the schedule (total_steps 60)" in result.stderr
    )
    assert (tmp_path / "digits" / "run_0" / "checkpoints" / "ckpt.60.pt").is_file()
