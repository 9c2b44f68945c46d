"""Images in :mod:`ml.loggers.base` (lazy, converted once, laid out in grids), written by TensorBoard
and read back from its event files; stdout and JSON lines leave them out. Also the hook that keeps
each logger's state in checkpoints, keyed by logger."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml.core.state import State
from ml.loggers.base import (
    GRID_PADDING_VALUE,
    BaseLogger,
    BaseLoggerConfig,
    LogBatch,
    MultiLogger,
    image_grid,
    load_logger_states,
    logger_states,
    to_image,
)
from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig
from ml.loggers.stdout import StdoutLogger, StdoutLoggerConfig
from ml.loggers.tensorboard import TensorboardLogger, TensorboardLoggerConfig

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


class Recorder(BaseLogger[BaseLoggerConfig]):
    """Keeps what it is given; writes every 10 steps."""

    def __init__(self, name: str = "recorder") -> None:
        super().__init__(BaseLoggerConfig(name=name, write_every_n_seconds=None, write_every_n_steps=10))
        self.batches: list[LogBatch] = []
        self.saved: dict = {}

    def write(self, state: State, batch: LogBatch) -> None:
        self.batches.append(batch)

    def state_dict(self) -> dict:
        return dict(self.saved)

    def load_state_dict(self, state: dict) -> None:  # type: ignore[override]
        self.saved = dict(state)


def test_an_image_is_read_only_when_a_logger_writes() -> None:
    calls = []

    def image() -> torch.Tensor:
        calls.append(1)
        return torch.full((3, 2, 2), 0.5)

    recorder = Recorder()
    source = MultiLogger("valid")
    state = State()
    state.num_steps = 1
    source.log_scalar("loss", 1.0)
    MultiLogger.write_all([source], [recorder], state)  # the first write: due
    recorder.batches.clear()
    state.num_steps = 5  # not due: dropped without being read
    source.log_image("sample", image)
    source.log_images("grid", lambda: [image(), image()])
    MultiLogger.write_all([source], [recorder], state)
    assert calls == [] and len(recorder.batches) == 0
    state.num_steps = 11
    source.log_image("sample", image)
    MultiLogger.write_all([source], [recorder], state)
    assert calls == [1]
    (batch,) = recorder.batches
    written = batch.images["valid/sample"]
    assert (written.dtype, tuple(written.shape), written.device.type) == (torch.uint8, (3, 2, 2), "cpu")
    assert torch.all(written == 128)  # 0.5 of 255, rounded


def test_images_are_converted_to_uint8_channels_first() -> None:
    assert torch.equal(
        to_image(torch.tensor([[0.0, 1.0], [2.0, -1.0]])), torch.tensor([[[0, 255], [255, 0]]])
    )
    assert torch.equal(to_image(torch.tensor([[True, False]])), torch.tensor([[[255, 0]]], dtype=torch.uint8))
    rgba = torch.zeros(4, 1, 1, dtype=torch.uint8)
    assert tuple(to_image(rgba).shape) == (3, 1, 1)  # alpha dropped
    assert to_image(torch.full((1, 1, 1), float("nan"))).item() == 0
    for bad in (torch.zeros(2, 3, 3), torch.zeros(3), torch.zeros(1, 1, 3, 3), torch.zeros(1, 0, 3)):
        with pytest.raises(ValueError, match="a logged image must be"):
            to_image(bad)


def test_a_grid_lays_images_out_row_by_row_with_grey_between() -> None:
    tiles = [torch.full((2, 3), value, dtype=torch.uint8) for value in (10, 20, 30, 40, 50)]
    grid = image_grid(tiles, padding=1)  # 5 images: 3 per row, 2 rows
    assert tuple(grid.shape) == (1, 1 + 2 * (2 + 1), 1 + 3 * (3 + 1))
    for index, value in enumerate((10, 20, 30, 40, 50)):
        top, left = 1 + (index // 3) * 3, 1 + (index % 3) * 4
        assert torch.all(grid[0, top : top + 2, left : left + 3] == value)
    painted = sum(2 * 3 for _ in tiles)
    assert int((grid == GRID_PADDING_VALUE).sum()) == grid.numel() - painted  # the rest is padding
    assert tuple(image_grid(torch.zeros(4, 1, 5, 5), columns=4).shape) == (1, 9, 30)
    colour = image_grid([torch.zeros(3, 2, 2), torch.ones(1, 2, 2)])  # grey beside RGB: grey in RGB
    assert colour.shape[0] == 3 and torch.all(colour[:, 2:4, 6:8] == 255)
    assert tuple(image_grid([]).shape) == (1, 1, 1)
    with pytest.raises(ValueError, match="one size"):
        image_grid([torch.zeros(2, 2), torch.zeros(3, 3)])


def test_tensorboard_writes_images_read_back_from_the_event_file(tmp_path: Path) -> None:
    logger = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard"))
    logger.initialize(tmp_path)
    state = State()
    state.set_phase("valid")
    images = [torch.rand(3, 4, 5) for _ in range(2)]
    for step, image in zip((10, 20), images, strict=True):
        state.num_steps = step
        source = MultiLogger("valid")
        source.log_image("sample", image)
        source.log_images("grid", torch.stack([image, image]), columns=2)
        logger.write(state, source.materialize())
    logger.close()

    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard" / "valid"), size_guidance={"images": 0}
    )
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["valid/grid", "valid/sample"]
    for event, image in zip(acc.Images("valid/sample"), images, strict=True):
        decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(event.encoded_image_string))))
        decoded = decoded.permute(2, 0, 1)
        assert torch.equal(decoded, to_image(image))  # PNG: lossless
    assert [e.step for e in acc.Images("valid/sample")] == [10, 20]
    assert [(e.width, e.height) for e in acc.Images("valid/grid")] == [(2 + 2 * 7, 2 + 6)] * 2


def test_stdout_and_jsonl_leave_images_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = LogBatch(
        scalars={"valid/loss": 0.5}, images={"valid/grid": torch.zeros(1, 2, 2, dtype=torch.uint8)}
    )
    state = State()
    for logger in (
        JsonlLogger(JsonlLoggerConfig(name="jsonl")),
        StdoutLogger(StdoutLoggerConfig(name="stdout")),
    ):
        logger.initialize(tmp_path)
        logger.write(state, batch)
        logger.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["metrics"] == {"valid/loss": 0.5} and "images" not in record
    assert "grid" not in capsys.readouterr().out


def test_logger_states_are_kept_by_name_whatever_the_order() -> None:
    first, second, other = Recorder("mlflow"), Recorder("mlflow"), Recorder("stdout")
    first.saved, second.saved = {"run_id": "a"}, {"run_id": "b"}
    states = logger_states([first, other, second])
    assert states == {"mlflow": {"run_id": "a"}, "mlflow#2": {"run_id": "b"}}  # empty ones are left out
    again = [Recorder("stdout"), Recorder("mlflow"), Recorder("wandb"), Recorder("mlflow")]
    load_logger_states(again, states)
    assert [r.saved for r in again] == [{}, {"run_id": "a"}, {}, {"run_id": "b"}]
    load_logger_states(again, None)  # a checkpoint without the key changes nothing
    assert again[1].saved == {"run_id": "a"}
