"""Defines ``ml export EXP_DIR -o model.safetensors [--checkpoint PATH_OR_STEP|best] [--ema] [--force]``.

Reads a run's newest checkpoint that verifies (:func:`ml.run.checkpoints.newest_verified_checkpoint`,
the one resuming would continue from: a damaged newer one is skipped, with a warning naming it and
the one used), or a chosen one (a path, or a step number meaning ``checkpoints/ckpt.<step>.pt``),
with the safe reader (checksum checked, ``weights_only``; a sharded folder's shards against the
SHA-256s of its manifest: a damaged or foreign one is refused with one line, exit code 2, and so is
a shard DCP cannot read), and writes the model's weights - or with ``--ema`` the moving average of
them that ``trainer.ema`` kept - as safetensors plus the run's resolved config beside them
(``model.safetensors`` -> ``model.yaml``). A run still training may be exported: what verified is
what is read, even as the run replaces its checkpoints (:func:`_read`);
see :mod:`ml.models.export`. ``ml.load_model("model.safetensors")`` rebuilds the model from the two.

An existing output is never overwritten without ``--force`` (the config beside it included), and
both files are written atomically, so a failed export leaves what was there before.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ml.tools import tool_parser


def _run_folder(arg: str) -> Path:
    """The run folder ``arg`` names; BadInput when it is none (a parent of runs, a file, nothing)."""
    from ml.errors import BadInput

    path = Path(arg).expanduser()
    if not path.exists():
        raise BadInput(f"no such run folder: {arg}")
    if not path.is_dir():
        raise BadInput(f"{arg} is not a run folder; give the folder holding config.yaml and checkpoints/")
    if not (path / "checkpoints").is_dir() and not (path / "config.yaml").is_file():
        runs = sorted(p for p in path.glob("run_*") if p.is_dir())
        hint = f": give one of its runs, e.g. {runs[-1]}" if runs else " (no config.yaml, no checkpoints/)"
        raise BadInput(f"{arg} is not a run folder{hint}")
    return path


def _checkpoint_path(exp_dir: Path, choice: str | None) -> Path:
    """The checkpoint to export: the newest, a step's (``--checkpoint 500``), the best
    (``--checkpoint best``: what ``best.pt`` names), or a file.

    The newest is the newest candidate (nothing read yet); :func:`_read` falls back past it when it
    does not verify.
    """
    from ml.errors import BadInput, CheckpointError
    from ml.run.checkpoints import (
        best_checkpoint,
        is_sharded_checkpoint,
        newest_checkpoint,
        numbered_checkpoints,
        step_checkpoint,
    )
    from ml.run.layout import RunDir

    run = RunDir(exp_dir)
    if choice is None:
        try:
            newest = newest_checkpoint(run)
        except CheckpointError as e:
            raise BadInput(str(e)) from e
        if newest is None:
            raise BadInput(f"no checkpoint in {run.checkpoints} (the run has not saved one yet)")
        return newest.path
    if choice == "best":
        if not run.best_link.is_symlink():
            raise BadInput(
                f"no {run.best_link.name} in {run.checkpoints} "
                "(train with trainer.checkpoint.monitor to keep one)"
            )
        try:
            best = best_checkpoint(run)
        except CheckpointError as e:
            raise BadInput(str(e)) from e
        if best is None:
            raise BadInput(f"{run.best_link} names {os.readlink(run.best_link)}, which does not exist")
        return run.best_link
    if choice.isdigit():
        path = step_checkpoint(run, int(choice))
        if not path.exists():
            have = ", ".join(map(str, sorted(numbered_checkpoints(run)))) or "none"
            raise BadInput(f"no checkpoint of step {choice} in {run.checkpoints} (steps saved: {have})")
        return path
    path = Path(choice).expanduser()
    if not path.is_file() and not is_sharded_checkpoint(path):
        raise BadInput(f"--checkpoint: no such file {choice} (give a path, a step number or best)")
    return path


def _read(exp_dir: Path, choice: str | None, chosen: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The checkpoint to export, the file or folder it is (a link resolved when read), and what it
    holds: ``chosen``, or without ``--checkpoint`` the newest that verifies (a warning on stderr
    names each newer one skipped and the one used).

    A run still training may replace its checkpoints meanwhile: a sharded one's files are held open
    once verified (:func:`ml.utils.checkpoint.read_checkpoint`), and one removed before that sends
    the search back to the newest (:func:`ml.run.checkpoints.newest_verified_checkpoint`).
    """
    from ml.errors import BadInput, CheckpointError
    from ml.run.checkpoints import newest_verified_checkpoint
    from ml.run.layout import RunDir

    try:
        if choice is not None:
            return chosen, *_read_resolved(chosen)
        found = newest_verified_checkpoint(RunDir(exp_dir), _read_resolved)
    except CheckpointError as e:
        raise BadInput(str(e).strip().splitlines()[0]) from e
    if found is None:  # removed since _checkpoint_path saw it
        raise BadInput(f"no checkpoint in {RunDir(exp_dir).checkpoints} (the run has not saved one yet)")
    for warning in found.warnings:
        print(f"ml: warning: {warning}", file=sys.stderr)
    return found.checkpoint.path, *found.value


def _read_resolved(path: Path) -> tuple[Path, dict[str, Any]]:
    """What ``path`` names (a link resolved) and the checkpoint read from it; a link that moved on
    while its checkpoint was read (a run still training removed it) is read again."""
    from ml.errors import DamagedCheckpointError
    from ml.utils.checkpoint import read_checkpoint

    for _ in range(3):
        resolved = path.resolve()
        try:
            return resolved, read_checkpoint(resolved, device="cpu")
        except DamagedCheckpointError:
            if not path.is_symlink() or path.resolve() == resolved:
                raise
    return resolved, read_checkpoint(resolved, device="cpu")


def _check_output(output: str, force: bool) -> Path:
    """The output path, refused before any work when its suffix is wrong or it would overwrite."""
    from ml.errors import BadInput
    from ml.models.export import SUFFIX, config_path_beside

    path = Path(output).expanduser()
    if path.suffix != SUFFIX:
        raise BadInput(f"-o {output}: the output must end in {SUFFIX}, e.g. model{SUFFIX}")
    if path.is_dir():
        raise BadInput(f"-o {output} is a folder; give a file name ending in {SUFFIX}")
    if not path.parent.is_dir():
        raise BadInput(f"-o {output}: the folder {path.parent} does not exist")
    if not force:
        for existing in (path, config_path_beside(path)):
            if existing.exists() or existing.is_symlink():
                raise BadInput(f"{existing} exists; add --force to overwrite it")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "export",
        "Write a run's model weights as safetensors, with the run's config beside them "
        "(model.safetensors -> model.yaml); ml.load_model(path) rebuilds the model.",
    )
    parser.add_argument("exp_dir", metavar="EXP_DIR", help="the run folder (holding checkpoints/)")
    parser.add_argument("-o", "--output", required=True, help="the file to write, ending in .safetensors")
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_STEP",
        help="a checkpoint file or sharded checkpoint folder, a step number (checkpoints/ckpt.<step>.pt or "
        "ckpt.<step>/), or best (checkpoints/best.pt, "
        "kept by trainer.checkpoint.monitor); default: the newest",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="export the moving average of the weights (trained with trainer.ema)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    return parser


def main(argv: list[str]) -> int:
    """``ml export``: writes the weights and config; returns 0."""
    from ml.errors import BadInput

    args = _parser().parse_args(argv)
    exp_dir = _run_folder(args.exp_dir)
    output = _check_output(args.output, args.force)
    chosen = _checkpoint_path(exp_dir, args.checkpoint)  # bad input is refused before torch loads

    from ml.core.state import State
    from ml.models.export import ModelFileError, StreamedWeights, export_weights
    from ml.utils.checkpoint import ShardedState
    from ml.utils.sharded import model_tensor_specs, stream_model_tensors

    ckpt_path, source_path, ckpt = _read(exp_dir, args.checkpoint, chosen)
    raw_state = ckpt["state"]
    try:
        state = State.from_json(raw_state) if isinstance(raw_state, str) else State.from_dict(dict(raw_state))
    except (ValueError, TypeError) as e:
        raise BadInput(f"{ckpt_path}: bad trainer state ({e})") from e
    config_yaml = ckpt.get("config")
    if not isinstance(config_yaml, str) or not config_yaml.strip():
        raise BadInput(f"{ckpt_path} holds no run config, so the model could not be rebuilt from the export")
    weights = ckpt["model"]
    if args.ema:
        ema = ckpt.get("ema")
        if not isinstance(ema, dict):
            raise BadInput(
                f"{ckpt_path} holds no moving average of the weights (train with trainer.ema.decay=0.999)"
            )
        weights = ema.get("weights")
        if not ema.get("num_updates"):
            raise BadInput(
                f"{ckpt_path}: the moving average has not started by step {state.num_steps} "
                "(trainer.ema.start_step is later): it is still the untrained model; export without --ema"
            )
    if isinstance(weights, ShardedState):  # streamed from the shards, one tensor in memory at a time
        specs = model_tensor_specs(weights)
        weights = StreamedWeights(specs, stream_model_tensors(weights, specs))
    elif not isinstance(weights, dict):
        raise BadInput(f"{ckpt_path}: {'ema weights' if args.ema else 'model'} is not a state dict")
    try:
        written = export_weights(
            weights, config_yaml, output, step=state.num_steps, checkpoint=str(source_path)
        )
    except ModelFileError as e:
        raise BadInput(f"{ckpt_path}: {e}") from e
    what = "the moving average of step" if args.ema else "step"
    linked = os.path.relpath(source_path, ckpt_path.parent)
    source = f"{ckpt_path} -> {linked}" if ckpt_path.is_symlink() else str(ckpt_path)
    print(f"ml: exported {what} {written.step} from {source}")
    print(f"ml: weights {written.weights_path} ({written.num_tensors} tensors)")
    print(f"ml: config  {written.config_path}")
    return 0
