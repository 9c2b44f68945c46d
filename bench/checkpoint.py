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

``--sharded``: full against sharded checkpoints in a distributed job (``trainer.checkpoint.format``).
A model of 4 blocks of ~50M parameters (``--quick``: ~12M) with Adam's moments, sharded with FSDP2
over 1, 2 and 4 processes (real torchrun, gloo; one process: no FSDP), saved by the real trainer as
``full`` (gathered to rank 0, which writes alone), ``sharded`` (every rank writes its shards: DCP)
and ``sharded`` with ``async_save``; then loaded into a fresh model by the trainer's
``load_checkpoint``. Per rank: the state it holds ("shard MB"), the save's time, how long the loop
was blocked, the load's time, and the resident-set high-water mark above the resident set before
("peak extra MB": rank 0's and the largest of the others'). The per-byte costs it prints are what the
README's estimates for larger models start from.
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


BLOCKS = 4  # --sharded: the model's blocks (each WIDTH x WIDTH x DEPTH: ~50M parameters)
SHARDED_VARIANTS = ("full", "sharded", "sharded_async")
SHARDED_LABELS = {"full": "full (rank 0 writes)", "sharded": "sharded", "sharded_async": "sharded, async"}


def sharded_worker(variant: str, out: Path, width: int, depth: int) -> dict[str, Any] | None:
    """One save and one load of ``variant`` by every rank of this (torchrun) job; rank 0 returns
    every rank's figures, the others None."""
    import gc

    import torch
    from omegaconf import OmegaConf
    from torch import nn

    from ml.core.state import State
    from ml.models.base import BaseModel, BaseModelConfig
    from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig
    from ml.trainers.parallel import wrap_model
    from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
    from ml.utils.distributed import all_gather_object, barrier, get_rank

    class Blocks(BaseModel[BaseModelConfig]):
        def __init__(self) -> None:
            super().__init__(BaseModelConfig(name="bench"))
            self.blocks = nn.ModuleList(
                nn.Sequential(*(nn.Linear(width, width) for _ in range(depth))) for _ in range(BLOCKS)
            )

        def shard_units(self) -> list[nn.Module]:
            return list(self.blocks)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    class BenchTask(SupervisedLearningTask[SupervisedLearningTaskConfig]):
        def get_dataset(self, phase: Any) -> Any:
            raise NotImplementedError

        def compute_loss(self, model: Any, batch: Any, state: Any, output: Any) -> Any:
            raise NotImplementedError

    checkpoint = {
        "format": "full" if variant == "full" else "sharded",
        "async_save": variant == "sharded_async",
    }
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(out / "exp"), "parallel": "fsdp", "checkpoint": checkpoint},
    )
    trainer = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    distributed = trainer.setup_distributed()
    task = BenchTask(SupervisedLearningTaskConfig(name="bench", max_steps=1))

    def built() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Blocks()
        wrap_model(model, torch.device("cpu"), "fsdp", distributed=distributed)
        optim = torch.optim.Adam(model.parameters(), lr=1e-4)
        model(torch.randn(4, width)).square().mean().backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return model, optim

    model, optim = built()
    local = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters()
    )
    result: dict[str, Any] = {"rank": get_rank(), "shard_mb": 3 * local / 2**20}  # weights + 2 moments
    gc.collect()
    barrier()
    rss_before = _rss_mb()
    result["peak_reset"] = _reset_peak()
    started = time.perf_counter()
    trainer.save_checkpoint(State(num_steps=1), task, model, optim)  # type: ignore[arg-type]
    result["blocked_s"] = time.perf_counter() - started
    trainer.wait_for_checkpoint()
    barrier()  # rank 0 links once every rank has written: the save is over for all
    result["save_s"] = time.perf_counter() - started
    result["save_peak_extra_mb"] = _peak_mb() - rss_before

    del model, optim
    gc.collect()
    fresh, fresh_optim = built()
    gc.collect()
    barrier()
    rss_before = _rss_mb()
    _reset_peak()
    started = time.perf_counter()
    trainer.load_checkpoint(trainer.ckpt_path, task, fresh, fresh_optim)  # type: ignore[arg-type]
    barrier()
    result["load_s"] = time.perf_counter() - started
    result["load_peak_extra_mb"] = _peak_mb() - rss_before
    ranks = all_gather_object(result)
    return {"ranks": ranks} if get_rank() == 0 else None


def _run_sharded(variant: str, nproc: int, root: Path, width: int, depth: int) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"{variant}-{nproc}-", dir=root))
    worker_args = [
        __file__,
        "--sharded-worker",
        variant,
        "--out",
        str(out),
        f"--width={width}",
        f"--depth={depth}",
    ]
    launch = [sys.executable, *worker_args]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        launch += worker_args
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "ML_EXP_NAME")}
    env["OMP_NUM_THREADS"] = "1"
    try:
        result = subprocess.run(launch, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{variant} x {nproc} failed:\n{result.stderr[-3000:]}")
        line = next(x for x in reversed(result.stdout.splitlines()) if x.startswith("{"))
        return json.loads(line)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def sharded_main(args: argparse.Namespace) -> None:
    width, depth = (args.width // 2, args.depth) if args.quick else (args.width, args.depth)
    params = BLOCKS * depth * (width * width + width)
    state_mb = params * 3 * 4 / 2**20
    root = Path(tempfile.mkdtemp(prefix="ml-bench-sharded-", dir=args.dir))
    rows, samples = [], {}
    try:
        for nproc in args.nproc:
            for variant in SHARDED_VARIANTS:
                ranks = _run_sharded(variant, nproc, root, width, depth)["ranks"]
                samples[f"{variant}x{nproc}"] = ranks
                print(f"{variant} x {nproc}: {ranks}", file=sys.stderr)
                first, others = ranks[0], ranks[1:]
                rows.append(
                    {
                        "processes": nproc,
                        "variant": SHARDED_LABELS[variant],
                        "shard_mb": first["shard_mb"],
                        "save_s": max(r["save_s"] for r in ranks),
                        "blocked_s": max(r["blocked_s"] for r in ranks),
                        "save_mb_per_s": state_mb / max(r["save_s"] for r in ranks),
                        "load_s": max(r["load_s"] for r in ranks),
                        "save_peak_rank0_mb": first["save_peak_extra_mb"],
                        "save_peak_others_mb": max((r["save_peak_extra_mb"] for r in others), default=None),
                        "load_peak_rank0_mb": first["load_peak_extra_mb"],
                        "load_peak_others_mb": max((r["load_peak_extra_mb"] for r in others), default=None),
                    }
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{params / 1e6:.0f}M parameters ({BLOCKS} blocks) + Adam moments: {state_mb:.0f} MB of state\n")
    columns = (
        "processes x variant",
        "shard MB",
        "save s",
        "blocks loop s",
        "MB/s",
        "load s",
        "save peak+ r0",
        "others",
        "load peak+ r0",
        "others",
    )
    keys = (
        "shard_mb",
        "save_s",
        "blocked_s",
        "save_mb_per_s",
        "load_s",
        "save_peak_rank0_mb",
        "save_peak_others_mb",
        "load_peak_rank0_mb",
        "load_peak_others_mb",
    )
    lines = [
        [f"{r['processes']} x {r['variant']}", *(r[k] if r[k] is not None else "-" for k in keys)]
        for r in rows
    ]
    print(table(columns, lines))
    by = {(r["processes"], r["variant"]): r for r in rows}
    one_full, one_sharded = by.get((1, SHARDED_LABELS["full"])), by.get((1, SHARDED_LABELS["sharded"]))
    targets: dict[str, Any] = {}
    if one_full and one_sharded:
        targets["sharded_vs_full_save_per_byte_1proc"] = one_sharded["save_s"] / one_full["save_s"]
    for r in rows:
        if r["variant"] != SHARDED_LABELS["full"]:
            peak = max(v for v in (r["save_peak_rank0_mb"], r["save_peak_others_mb"]) if v is not None)
            targets[f"peak_over_shard_{r['processes']}x{r['variant']}"] = peak / r["shard_mb"]
    print("\n" + "; ".join(f"{k}: {v:.2f}" for k, v in targets.items()))
    print(
        "targets: sharded save time per byte on 1 process <= the full path's (ratio <= 1); "
        "peak <= shard + 10%"
    )
    write_results(
        "checkpoint_sharded",
        {"parameters": params, "state_mb": state_mb, "rows": rows, "targets": targets, "samples": samples},
    )


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
    parser.add_argument(
        "--sharded", action="store_true", help="Full vs sharded checkpoints in 1, 2, 4 processes"
    )
    parser.add_argument(
        "--nproc", type=int, nargs="+", default=[1, 2, 4], help="With --sharded: process counts"
    )
    parser.add_argument("--sharded-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, Path(args.out), args.width, args.depth)))
        return
    if args.sharded_worker is not None:
        found = sharded_worker(args.sharded_worker, Path(args.out), args.width, args.depth)
        if found is not None:
            print(json.dumps(found))
        return
    if args.sharded:
        sharded_main(args)
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
