"""Tests for :mod:`ml.loggers.tensorboard`: real event files read back, and the lazy import."""

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.registry import lookup
from ml.core.state import State
from ml.loggers.base import LogBatch
from ml.loggers.tensorboard import TensorboardLogger, TensorboardLoggerConfig

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(folder: Path) -> Any:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def _scalars(acc: Any, tag: str) -> list[tuple[int, Any]]:
    return [(event.step, pytest.approx(event.value)) for event in acc.Scalars(tag)]


def test_writes_scalars_per_phase(tmp_path: Path) -> None:
    lg = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard"))
    lg.initialize(tmp_path)
    state = State()
    for step, loss in ((1, 0.9), (2, 0.7), (3, 0.5)):
        state.num_steps = step
        lg.write(state, LogBatch(scalars={"train/loss": loss, "trainer/lr": 0.1 * step}))
    state.set_phase("valid")
    lg.write(state, LogBatch(scalars={"valid/loss": 0.6}))
    lg.close()

    train = _read(tmp_path / "tensorboard" / "train")
    assert sorted(train.Tags()["scalars"]) == ["train/loss", "trainer/lr"]
    assert _scalars(train, "train/loss") == [(1, 0.9), (2, 0.7), (3, 0.5)]
    assert _scalars(train, "trainer/lr") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    valid = _read(tmp_path / "tensorboard" / "valid")
    assert valid.Tags()["scalars"] == ["valid/loss"]
    assert _scalars(valid, "valid/loss") == [(3, 0.6)]
    assert not (tmp_path / "tensorboard" / "test").exists()  # writers are created lazily


def test_flush_every_0_seconds_puts_each_write_on_disk_at_once(tmp_path: Path) -> None:
    """0 means after every write; TensorBoard's own flush_secs=0 would spin its writer thread."""
    lg = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard", flush_every_n_seconds=0))
    lg.initialize(tmp_path)
    state = State()
    for step in range(1, 51):
        state.num_steps = step
        lg.write(state, LogBatch(scalars={"train/loss": 1.0 / step}))
        if step in (1, 50):  # readable before close, so a kill -9 now would keep it
            assert _scalars(_read(tmp_path / "tensorboard" / "train"), "train/loss")[-1][0] == step
    cpu_before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu_before < 0.1  # no writer thread spinning in the background
    lg.close()


def test_writes_text_histograms_and_config(tmp_path: Path) -> None:
    lg = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard"))
    lg.initialize(tmp_path)
    lg.log_config(OmegaConf.create({"optimizer": {"name": "adam", "lr": 0.001}}))
    histograms = {
        "model/weights": torch.tensor([1.0, 2.0, 2.0, float("nan")]),
        "model/empty": torch.tensor([float("inf")]),  # nothing finite: skipped
    }
    lg.write(State(num_steps=4), LogBatch(strings={"task/note": "hello"}, histograms=histograms))
    lg.close()

    acc = _read(tmp_path / "tensorboard" / "train")
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}
    assert set(texts) == {"config/text_summary", "task/note/text_summary"}
    (config_event,) = texts["config/text_summary"]
    config_text = config_event.tensor_proto.string_val[0].decode()
    assert "optimizer:" in config_text
    assert "lr: 0.001" in config_text
    (note_event,) = texts["task/note/text_summary"]
    assert (note_event.step, note_event.tensor_proto.string_val[0]) == (4, b"hello")
    assert acc.Tags()["histograms"] == ["model/weights"]
    (histogram,) = acc.Histograms("model/weights")
    assert histogram.step == 4
    assert histogram.histogram_value.num == 3  # the NaN was dropped
    assert (histogram.histogram_value.min, histogram.histogram_value.max) == (1.0, 2.0)


def test_use_before_initialize_raises() -> None:
    lg = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard"))
    with pytest.raises(RuntimeError, match="initialize"):
        lg.write(State(), LogBatch(scalars={"x": 1.0}))


def test_missing_tensorboard_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A None entry in sys.modules makes `import` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    lg = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard"))
    with pytest.raises(ImportError, match=r"pip install tensorboard.*ml-trainer\[tensorboard\]"):
        lg.initialize(tmp_path)


def test_import_does_not_import_tensorboard() -> None:
    code = (
        "import sys, ml.loggers.tensorboard\n"
        "loaded = sorted(m for m in sys.modules if m == 'tensorboard' or m.startswith('tensorboard.')"
        " or m.startswith('torch.utils.tensorboard'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_registered_as_tensorboard() -> None:
    assert lookup("logger", "tensorboard") == (TensorboardLogger, TensorboardLoggerConfig)
    assert TensorboardLoggerConfig(name="tensorboard").write_every_n_seconds == 10.0


def test_the_config_keeps_secrets_as_their_references(tmp_path: Path) -> None:
    """The trainer hands loggers the config resolved; a value config.yaml keeps as ``${ml.secret:X}``
    is written as that reference, never as the secret."""
    run = tmp_path / "run_0"
    run.mkdir()
    (run / "config.yaml").write_text("task:\n  token: ${ml.secret:DATA_TOKEN}\n  batch: 8\n")
    lg = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard"))
    lg.initialize(run / "logs")
    lg.log_config(OmegaConf.create({"task": {"token": "s3cr3t-value", "batch": 8}}))
    lg.close()
    acc = _read(run / "logs" / "tensorboard" / "train")
    (event,) = acc.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert "token: ${ml.secret:DATA_TOKEN}" in text and "batch: 8" in text
    assert "s3cr3t" not in text
