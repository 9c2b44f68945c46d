"""Measures checkpoint saving: ml's atomic save (and ``async_save``) against ``torch.save`` and Lightning.

The state is a ~50M-parameter MLP with Adam's moments (one step taken): ~600 MB. Each measurement
runs in a fresh interpreter (``--worker``), which builds the model, takes one step, then saves once
and loads the file once (``torch.load(weights_only=True)``), so no variant inherits another's memory
or caches. The variants, alternated for ``--repeat`` rounds, medians shown:

- ``torch.save``: ``torch.save(state, path)``, not made durable (no fsync).
- ``torch.save + fsync``: the same bytes, then ``fsync`` (the floor for a durable save).
- ``ml save_checkpoint``: the real trainer's save (``SupervisedLearningTrainer.save_checkpoint``):
  temp file, fsync, rename, fsync of the folder, link swap, ``.lock_ckpt``.
- ``ml async_save``: the same with ``trainer.checkpoint.async_save=true``. "blocks loop" is the time
  spent inside ``save_checkpoint`` (the copy to host memory); "save s" is the time until the write
  is durable and linked. The first save allocates the host copy; a later one (after another
  optimizer step) reuses it: both are shown.
- ``Lightning save_checkpoint``: ``lightning.pytorch.Trainer.save_checkpoint`` after a one-step
  ``fit`` of the same model (only when Lightning is installed: ``pip install -e ".[bench]"``).

"peak extra MB" is the process's resident-set high-water mark during the save minus its resident
set just before (``/proc/self/clear_refs`` resets the mark; where that is refused the mark of the
whole process is used, which can only overstate nothing but understate the extra). The files go to a
temporary folder on the filesystem of ``/tmp`` (``--dir`` to change). Run it with
``python bench/checkpoint.py`` (``--quick``: a ~12M-parameter model, one round).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import median, table, write_results

VARIANTS = ("torch_save", "torch_save_fsync", "ml", "ml_async", "lightning")
LABELS = {
    "torch_save": "torch.save (no fsync)",
    "torch_save_fsync": "torch.save + fsync",
    "ml": "ml save_checkpoint (atomic)",
    "ml_async": "ml async_save, first save",
    "ml_async_warm": "ml async_save, later saves",
    "lightning": "Lightning save_checkpoint",
}
WIDTH, DEPTH = 2048, 12  # 12 layers of 2048 x 2048 (+ bias): 50.4M parameters


# ---------------------------------------------------------------------------------------------
# Inside a worker process


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_mb() -> float:
    return _status_kib("VmRSS") / 1024


def _reset_peak() -> bool:
    """Resets the resident-set high-water mark to the current resident set (Linux); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        return _status_kib("VmHWM") / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(width: int, depth: int) -> tuple[Any, Any, Any]:
    """The ml model (an MLP), an Adam optimizer after one step, and the device they are on."""
    import torch
    from torch import nn

    from ml.models.base import BaseModel, BaseModelConfig

    class BenchModel(BaseModel[BaseModelConfig]):
        def __init__(self) -> None:
            super().__init__(BaseModelConfig(name="bench"))
            self.net = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BenchModel().to(device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)
    _step(model, optim, device)
    return model, optim, device


def _step(model: Any, optim: Any, device: Any) -> None:
    import torch

    width = model.net[0].in_features
    model(torch.randn(8, width, device=device)).square().mean().backward()
    optim.step()
    optim.zero_grad(set_to_none=True)  # no gradients held during the save


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ml_trainer(out: Path, async_save: bool) -> tuple[Any, Any]:
    from omegaconf import OmegaConf
    from torch.utils.data import Dataset

    from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig
    from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig

    class BenchTask(SupervisedLearningTask[SupervisedLearningTaskConfig]):
        def get_dataset(self, phase: Any) -> Dataset:
            raise NotImplementedError

        def compute_loss(self, model: Any, batch: Any, state: Any, output: Any) -> Any:
            raise NotImplementedError

    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(out / "exp"), "checkpoint": {"async_save": async_save}},
    )
    trainer = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    return trainer, BenchTask(SupervisedLearningTaskConfig(name="bench", max_steps=1))


def _lightning_fit(width: int, depth: int) -> tuple[Any, Any]:
    """A Lightning trainer after a one-step ``fit`` of the same model; it and the module."""
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class BenchModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    module = BenchModule()
    trainer = pl.Trainer(
        max_steps=1,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, width)), batch_size=8))
    return trainer, module


def _time_load(path: Path) -> float:
    import torch

    started = time.perf_counter()
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    elapsed = time.perf_counter() - started
    del loaded
    return elapsed


def worker(variant: str, out: Path, width: int, depth: int) -> dict[str, Any]:
    """One measurement of ``variant`` in this fresh process; the figures as a dict."""
    import torch

    from ml.core.state import State

    path = out / "ckpt.pt"
    result: dict[str, Any] = {}
    if variant == "lightning":
        trainer, module = _lightning_fit(width, depth)
        device = module.device
        save: Any = lambda: trainer.save_checkpoint(path)  # noqa: E731
    else:
        model, optim, device = _build(width, depth)
        if variant in ("torch_save", "torch_save_fsync"):
            state = {"model": model.state_dict(), "optim": optim.state_dict()}

            def save() -> None:
                if variant == "torch_save":
                    torch.save(state, path)
                    return
                with open(path, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())

        else:
            ml_trainer, task = _ml_trainer(out, async_save=variant == "ml_async")

            def save() -> None:
                ml_trainer.save_checkpoint(State(num_steps=1), task, model, optim)
                result["blocked_s"] = time.perf_counter() - started
                ml_trainer.wait_for_checkpoint()

    _sync(device)
    rss_before = _rss_mb()
    result["peak_reset"] = _reset_peak()
    started = time.perf_counter()
    save()
    result["save_s"] = time.perf_counter() - started
    result["peak_extra_mb"] = _peak_mb() - rss_before
    result["rss_mb"] = rss_before
    if variant in ("ml", "ml_async"):
        path = ml_trainer.ckpt_path.resolve()
    result["file_mb"] = path.stat().st_size / 2**20
    if variant == "ml_async":  # a later save reuses the host copy of the first
        _step(model, optim, device)
        _sync(device)
        rss_before = _rss_mb()
        _reset_peak()
        started = time.perf_counter()
        ml_trainer.save_checkpoint(State(num_steps=2), task, model, optim)
        result["warm_blocked_s"] = time.perf_counter() - started
        ml_trainer.wait_for_checkpoint()
        result["warm_save_s"] = time.perf_counter() - started
        result["warm_peak_extra_mb"] = _peak_mb() - rss_before
        path = ml_trainer.ckpt_path.resolve()
    result["load_s"] = _time_load(path)
    return result


# ---------------------------------------------------------------------------------------------
# The driver


def _run_worker(variant: str, root: Path, width: int, depth: int) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=root))
    try:
        env = dict(os.environ)
        env.pop("ML_EXP_NAME", None)
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                variant,
                "--out",
                str(out),
                f"--width={width}",
                f"--depth={depth}",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _rows(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    def med(variant: str, key: str) -> float:
        return median([s[key] for s in samples.get(variant, []) if key in s])

    fsync = med("torch_save_fsync", "save_s")
    rows = []
    for variant in (*VARIANTS[:4], "ml_async_warm", VARIANTS[4]):
        base, prefix = ("ml_async", "warm_") if variant == "ml_async_warm" else (variant, "")
        if base not in samples:
            continue
        save = med(base, prefix + "save_s")
        rows.append(
            {
                "variant": LABELS[variant],
                "save_s": save,
                "vs_fsync": save / fsync,
                "blocked_s": med(base, prefix + "blocked_s") if base == "ml_async" else save,
                "load_s": med(base, "load_s"),
                "file_mb": med(base, "file_mb"),
                "peak_extra_mb": med(base, prefix + "peak_extra_mb"),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="Rounds of all variants (medians shown)")
    parser.add_argument("--quick", action="store_true", help="A ~12M-parameter model, one round")
    parser.add_argument("--dir", default=None, help="Where the files go (default: a folder in /tmp)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=WIDTH, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=DEPTH, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, Path(args.out), args.width, args.depth)))
        return

    width, depth, repeat = (
        (args.width // 2, args.depth, 1) if args.quick else (args.width, args.depth, args.repeat)
    )
    variants = [v for v in VARIANTS if v != "lightning" or _has_lightning()]
    params = depth * (width * width + width)
    root = Path(tempfile.mkdtemp(prefix="ml-bench-checkpoint-", dir=args.dir))
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        for round_ in range(repeat):
            for variant in variants if round_ % 2 == 0 else variants[::-1]:  # alternated, both ways
                samples[variant].append(_run_worker(variant, root, width, depth))
                print(f"round {round_ + 1}/{repeat} {variant}: {samples[variant][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = _rows(samples)
    state_mb = params * 3 * 4 / 2**20
    print(f"\n{params / 1e6:.1f}M parameters + Adam moments: {state_mb:.0f} MB of state; {repeat} round(s)\n")
    columns = ("variant", "save s", "x fsync", "blocks loop s", "load s", "file MB", "peak extra MB")
    keys = ("variant", "save_s", "vs_fsync", "blocked_s", "load_s", "file_mb", "peak_extra_mb")
    print(table(columns, [[r[k] for k in keys] for r in rows]))

    by = {r["variant"]: r for r in rows}
    targets = {
        "atomic_vs_fsync": by[LABELS["ml"]]["vs_fsync"],
        "atomic_peak_extra_mb": by[LABELS["ml"]]["peak_extra_mb"],
        "async_blocked_vs_sync": by[LABELS["ml_async_warm"]]["blocked_s"] / by[LABELS["ml"]]["save_s"],
        "async_first_blocked_vs_sync": by[LABELS["ml_async"]]["blocked_s"] / by[LABELS["ml"]]["save_s"],
    }
    print(
        f"\nml atomic save / torch.save+fsync: {targets['atomic_vs_fsync']:.2f} (target <= 1.2); "
        f"its extra peak: {targets['atomic_peak_extra_mb']:.0f} MB (target: ~0)\n"
        f"async_save blocks the loop for {targets['async_blocked_vs_sync']:.0%} of a synchronous save "
        f"({targets['async_first_blocked_vs_sync']:.0%} the first time; target < 20%)"
    )
    if not all(s.get("peak_reset", True) for v in samples.values() for s in v):
        print("note: /proc/self/clear_refs was refused: peaks are the whole process's", file=sys.stderr)
    write_results(
        "checkpoint",
        {
            "parameters": params,
            "state_mb": state_mb,
            "repeat": repeat,
            "rows": rows,
            "targets": targets,
            "samples": samples,
        },
        peers=("lightning",),
    )


def _has_lightning() -> bool:
    import importlib.util

    return importlib.util.find_spec("lightning") is not None


if __name__ == "__main__":
    main()
