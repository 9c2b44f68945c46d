"""Tests ``ml export`` and ``ml.load_model`` on a real short run of the packaged digits job.

- The exported model, rebuilt by ``ml.load_model``, gives the same outputs (bit for bit) as the
  model rebuilt by hand from the checkpoint; so it does from the config in the file's metadata
  when the YAML beside it is gone.
- The file is plain safetensors (a JSON header and raw tensor bytes, nothing else), with the
  format, version, step and model config in its metadata, and the run's config beside it.
- ``--checkpoint STEP`` and ``--checkpoint PATH`` export that checkpoint's weights.
- Tied weights, non-contiguous tensors and DDP/compile key prefixes export and load back.
- Bad input (no run folder, no checkpoint, a truncated checkpoint, an existing output, a wrong
  suffix) is one ``ml: error:`` line with exit code 2, and nothing on disk changes.

The runs are trained once per test process by :func:`trained_runs` (concurrently, each in its own
``RUN_DIR``); ``test_diff.py`` and ``test_tensorboard.py`` use them too.
"""

import io
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import ml
from ml.cli import main as ml_main
from ml.core.config import conf_field
from ml.models.base import BaseModel, BaseModelConfig
from ml.models.export import ModelFileError

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 180
BASE = ["digits", "task.max_steps=5", "lr_scheduler.warmup_steps=1"]  # digits warms up for 100 steps
KEEP_ALL = ["trainer.checkpoint.save_every_n_steps=2", "trainer.checkpoint.only_save_most_recent=false"]
# Each run: its overrides. `a` keeps every checkpoint (steps 2, 4 and the final 5); `b` differs
# from it in two settings and logs to metrics.jsonl alone; `c` is `a` again.
RUNS: dict[str, list[str]] = {
    "a": [*BASE, *KEEP_ALL],
    "b": [*BASE, "optimizer.lr=3e-4", "task.train_dl.batch_size=32", "logger=[{name: jsonl}]"],
    "c": [*BASE, *KEEP_ALL],
}
_trained: dict[str, Path] = {}
_lock = threading.Lock()


def env(run_dir: Path | None = None) -> dict[str, str]:
    """The environment for ``ml`` subprocesses: one process, not a rank of some outer job."""
    out = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
    }
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if run_dir is not None:
        out["RUN_DIR"] = str(run_dir)
    return out


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Runs ``python -c code`` in the ``ml`` subprocess environment; its output captured as text."""
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def trained_runs(factory: pytest.TempPathFactory, *names: str) -> dict[str, Path]:
    """The run folders of the named :data:`RUNS`, trained (those not trained yet) concurrently."""
    with _lock:
        missing = [name for name in names if name not in _trained]
        base = factory.getbasetemp() / "tools_runs"
        procs = {}
        for name in missing:
            run_dir = base / name
            run_dir.mkdir(parents=True, exist_ok=True)
            procs[name] = subprocess.Popen(
                [*ML, "train", *RUNS[name]],
                env=env(run_dir),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        for name, proc in procs.items():
            output, _ = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, output[-3000:]
            _trained[name] = base / name / "digits" / "run_0"
        return {name: _trained[name] for name in names}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_runs(tmp_path_factory, "a")["a"]


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The newest checkpoint, exported by ``ml export`` (in this process: torch is loaded already)."""
    out = tmp_path_factory.mktemp("export") / "model.safetensors"
    with redirect_stdout(io.StringIO()) as stdout:
        assert ml_main(["export", str(run), "-o", str(out)]) == 0
    lines = stdout.getvalue().splitlines()
    num_tensors = len(torch.load(run / "checkpoints" / "ckpt.pt", weights_only=True)["model"])
    assert lines == [
        f"ml: exported step 5 from {run / 'checkpoints' / 'ckpt.pt'} -> ckpt.5.pt",
        f"ml: weights {out} ({num_tensors} tensors)",
        f"ml: config  {out.with_suffix('.yaml')}",
    ]
    return out


def export(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ml export ARGS`` in this process (the same code path as the command; torch is loaded already)."""
    code = ml_main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _images() -> torch.Tensor:
    """A batch of 64 images of 8x8 pixels in [0, 1], like the digits'."""
    return torch.rand(64, 64, generator=torch.Generator().manual_seed(0))


def _model_by_hand(ckpt_path: Path) -> torch.nn.Module:
    """The run's model rebuilt from its checkpoint without ml.export: config dataclass, weights."""
    from ml.examples.digits import DigitsCNN, DigitsCNNConfig

    ckpt = torch.load(ckpt_path, weights_only=True)
    section = OmegaConf.create(ckpt["config"]).model
    assert section.name == "digits_cnn"
    model = DigitsCNN(OmegaConf.merge(OmegaConf.structured(DigitsCNNConfig), section))  # type: ignore[arg-type]
    model.load_state_dict(ckpt["model"])
    return model.eval()


def test_load_model_gives_the_outputs_of_the_checkpointed_model(run: Path, exported: Path) -> None:
    model = ml.load_model(exported)
    assert type(model).__name__ == "DigitsCNN" and not model.training
    reference = _model_by_hand(run / "checkpoints" / "ckpt.pt")
    images = _images()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    # Trained weights, not fresh ones: a model built from the config alone answers differently.
    fresh = type(reference)(reference.config).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(images), reference(images))


def test_the_file_is_plain_safetensors_with_metadata_and_the_config_beside(run: Path, exported: Path) -> None:
    from safetensors import safe_open

    data = exported.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.pop("__metadata__")
    # A JSON header and raw tensor bytes that fill the file exactly: there is no room for a pickle.
    spans = sorted(tuple(entry["data_offsets"]) for entry in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert 8 + header_len + spans[-1][1] == len(data)

    ckpt = torch.load(run / "checkpoints" / "ckpt.pt", weights_only=True)
    with safe_open(str(exported), framework="pt") as f:
        assert sorted(f.keys()) == sorted(ckpt["model"])
        for key in ckpt["model"]:
            assert torch.equal(f.get_tensor(key), ckpt["model"][key])
        assert f.metadata() == metadata
    assert metadata["ml.format_version"] == "1"
    assert metadata["ml.version"] == ml.__version__
    assert metadata["ml.step"] == "5"
    assert json.loads(metadata["ml.model_config"]) == yaml.safe_load(ckpt["config"])["model"]
    assert metadata["ml.config"] == ckpt["config"]
    assert exported.with_suffix(".yaml").read_text() == ckpt["config"]


def test_load_model_without_the_yaml_uses_the_config_in_the_metadata(
    run: Path, exported: Path, tmp_path: Path
) -> None:
    alone = tmp_path / "alone.safetensors"
    shutil.copy(exported, alone)
    model = ml.load_model(alone, device="cpu")
    images = _images()
    with torch.no_grad():
        assert torch.equal(model(images), _model_by_hand(run / "checkpoints" / "ckpt.pt")(images))


@pytest.mark.parametrize("how", ["step", "path"])
def test_an_older_checkpoint_exports_that_steps_weights(
    run: Path, how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt.*.pt")) == [
        "ckpt.2.pt",
        "ckpt.4.pt",
        "ckpt.5.pt",
    ]
    ckpt_path = run / "checkpoints" / "ckpt.2.pt"
    out = tmp_path / "old.safetensors"
    code, stdout, _ = export(
        str(run), "-o", str(out), "--checkpoint", "2" if how == "step" else str(ckpt_path), capsys=capsys
    )
    assert code == 0 and "step 2" in stdout
    model = ml.load_model(out)
    images = _images()
    with torch.no_grad():
        assert torch.equal(model(images), _model_by_hand(ckpt_path)(images))
        assert not torch.equal(model(images), _model_by_hand(run / "checkpoints" / "ckpt.5.pt")(images))


def test_load_model_names_a_missing_file_a_foreign_file_and_a_config_that_does_not_fit(
    run: Path, exported: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="no such model file"):
        ml.load_model(tmp_path / "nothing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    shutil.copy(run / "checkpoints" / "ckpt.5.pt", foreign)  # a torch zip, not safetensors
    with pytest.raises(ModelFileError, match="is not a safetensors file"):
        ml.load_model(foreign)

    other = tmp_path / "other.safetensors"
    shutil.copy(exported, other)
    config = yaml.safe_load(exported.with_suffix(".yaml").read_text())
    config["model"]["channels"] = 16
    other.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    for strict in (True, False):  # a weight of another shape fits neither way
        with pytest.raises(
            ModelFileError, match=r"do not fit the model digits_cnn .*size mismatch for features\.0\.weight"
        ):
            ml.load_model(other, strict=strict)
    config["model"] = {"name": "digits_mlp"}
    other.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelFileError, match="Missing key"):
        ml.load_model(other)


@dataclass
class TiedConfig(BaseModelConfig):
    size: int = conf_field(4, help="Embedding width")


class TiedModel(BaseModel[TiedConfig]):
    """A model whose output layer shares the embedding's weight, with a non-contiguous buffer."""

    def __init__(self, config: TiedConfig) -> None:
        super().__init__(config)
        self.embed = torch.nn.Embedding(10, config.size)
        self.out = torch.nn.Linear(config.size, 10, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(1.0, 1.0 + 10 * config.size).reshape(config.size, 10).t())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens)) * self.scale[tokens].sum(-1, keepdim=True)


def test_tied_weights_views_and_wrapper_prefixes_export_and_load(tmp_path: Path) -> None:
    from ml.models.export import export_weights

    torch.manual_seed(0)
    model = TiedModel(TiedConfig(name=f"{__name__}:TiedModel")).eval()
    state = model.state_dict()
    assert state["out.weight"].data_ptr() == state["embed.weight"].data_ptr()
    assert not state["scale"].is_contiguous()
    wrapped = {f"module._orig_mod.{key}": value for key, value in state.items()}  # as DDP + compile name them
    config = yaml.safe_dump({"model": {"name": f"{__name__}:TiedModel", "size": 4}})
    out = tmp_path / "tied.safetensors"
    written = export_weights(wrapped, config, out, step=3)
    assert (written.step, written.num_tensors) == (3, 3)

    loaded = ml.load_model(out)
    assert isinstance(loaded, TiedModel) and loaded.out.weight is loaded.embed.weight
    tokens = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def export_error(*args: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``ml: error:`` line of ``ml export ARGS``, which must exit with code 2."""
    code, _, err = export(*args, capsys=capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ml: error: "), err
    return lines[0]


def test_bad_input_is_one_line_and_changes_nothing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.safetensors"
    # Not a run folder: an empty folder, and the experiment folder holding run_0.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is not a run folder" in export_error(str(empty), "-o", str(out), capsys=capsys)
    assert f"e.g. {run}" in export_error(str(run.parent), "-o", str(out), capsys=capsys)
    assert "no such run folder" in export_error(str(tmp_path / "nope"), "-o", str(out), capsys=capsys)
    # A run that has not saved a checkpoint yet; a step that was not saved.
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", fresh / "config.yaml")
    assert "no checkpoint in" in export_error(str(fresh), "-o", str(out), capsys=capsys)
    line = export_error(str(run), "-o", str(out), "--checkpoint", "3", capsys=capsys)
    assert "steps saved: 2, 4, 5" in line
    # A wrong suffix.
    assert "must end in .safetensors" in export_error(str(run), "-o", str(tmp_path / "m.pt"), capsys=capsys)
    assert not out.exists() and not (tmp_path / "m.pt").exists() and not out.with_suffix(".yaml").exists()
    # A folder that does not exist is refused, not made (as `ml plot -o` does).
    nested = tmp_path / "no" / "such" / "model.safetensors"
    assert "the folder" in export_error(str(run), "-o", str(nested), capsys=capsys)
    assert not (tmp_path / "no").exists()

    # Truncated checkpoints (in a copy of the run): the newest that is not is exported, and a
    # warning names both; with none left whole, the safe reader's one line.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    for step in (5, 4, 2):
        newest = copy / "checkpoints" / f"ckpt.{step}.pt"
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        if step != 2:
            fallback = tmp_path / f"fallback_{step}.safetensors"
            code, printed, err = export(str(copy), "-o", str(fallback), capsys=capsys)
            used = copy / "checkpoints" / f"ckpt.{2 if step == 4 else 4}.pt"
            assert code == 0 and f"exported step {used.name.split('.')[1]} from {used}" in printed, err
            (warning,) = err.strip().splitlines()
            assert warning.startswith(f"ml: warning: skipping {copy / 'checkpoints' / 'ckpt.5.pt'} (")
            assert "truncated" in warning and warning.endswith(
                f"using {used}, the newest checkpoint that verifies"
            )
    assert "truncated" in export_error(str(copy), "-o", str(out), capsys=capsys)
    assert not out.exists()

    # An existing output is kept without --force, and replaced with it.
    out.write_bytes(b"precious")
    before = out.stat()
    line = export_error(str(run), "-o", str(out), capsys=capsys)
    assert "exists; add --force" in line
    assert out.read_bytes() == b"precious" and out.stat().st_mtime_ns == before.st_mtime_ns
    assert not out.with_suffix(".yaml").exists()
    code, _, err = export(str(run), "-o", str(out), "--force", capsys=capsys)
    assert code == 0, err
    assert ml.load_model(out) is not None and out.read_bytes()[:8] != b"precious"


def test_load_model_imports_no_module_the_file_names_unless_trusted(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file from elsewhere may name any installed module as its model's; importing it runs it."""
    (tmp_path / "lib").mkdir()
    marker = tmp_path / "imported"
    (tmp_path / "lib" / "chosen_by_the_file.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    other = tmp_path / "other.safetensors"
    shutil.copy(exported, other)
    config = yaml.safe_load(exported.with_suffix(".yaml").read_text())
    config["model"] = {"name": "chosen_by_the_file:Net"}
    other.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        ModelFileError, match="whose module chosen_by_the_file is not imported: import it first"
    ):
        ml.load_model(other)
    assert not marker.exists()
    with pytest.raises(ModelFileError, match="has no class 'Net'"):
        ml.load_model(other, trust_imports=True)
    assert marker.exists()  # trusted: imported
    sys.modules.pop("chosen_by_the_file", None)
