"""``ml train digits`` shows the validation images it got wrong, as a grid in TensorBoard, at each
validation: as many images as valid/accuracy says it missed (at most 64)."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.examples.digits import MAX_MISCLASSIFIED_SHOWN, SPLIT_SIZES
from ml.loggers.base import GRID_PADDING_VALUE

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _grid_size(count: int, tile: int = 8, padding: int = 2) -> tuple[int, int]:
    """(width, height) of image_grid's layout of ``count`` tiles."""
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    return padding + columns * (tile + padding), padding + rows * (tile + padding)


def test_each_validation_logs_a_grid_of_the_misclassified_images(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
    }
    env.update(RUN_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "ml"),
            "train",
            "digits",
            "task.max_steps=30",
            "trainer.valid_every_n_steps=15",
            "lr_scheduler.warmup_steps=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = tmp_path / "digits" / "run_0" / "logs"
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    accuracy = {r["step"]: r["metrics"]["valid/accuracy"] for r in records if r["phase"] == "valid"}
    assert sorted(accuracy) == [15, 30]

    acc = event_accumulator.EventAccumulator(str(logs / "tensorboard" / "valid"), size_guidance={"images": 0})
    acc.Reload()
    events = acc.Images("valid/misclassified")
    assert [e.step for e in events] == [15, 30]
    assert round((1 - accuracy[30]) * SPLIT_SIZES["valid"]) < MAX_MISCLASSIFIED_SHOWN, accuracy  # not capped
    for event in events:
        missed = round((1 - accuracy[event.step]) * SPLIT_SIZES["valid"])
        shown = min(missed, MAX_MISCLASSIFIED_SHOWN)
        assert shown > 0  # 30 steps of training leave some
        assert (event.width, event.height) == _grid_size(shown)
        pixels = np.array(Image.open(io.BytesIO(event.encoded_image_string)))
        assert pixels.shape == (event.height, event.width, 3)  # TensorBoard keeps grey as RGB
        assert (pixels == pixels[:, :, :1]).all()  # grey: the digits' one channel
        assert pixels[0, 0, 0] == GRID_PADDING_VALUE and pixels[2:10, 2:10].max() > 0  # a digit's ink
