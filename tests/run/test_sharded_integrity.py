"""A sharded checkpoint is one save's, and what verified is what is read (real DCP files, one process).

- ``ml.pt`` holds the SHA-256 of the manifest written with it: an ``ml.pt`` copied in from another
  checkpoint's folder - another step, or another save of the same step - makes the folder damaged:
  resume and ``ml export`` skip it for an older one that verifies, ``ml export`` of it by name is
  one line. A save of the same step again binds the new ``ml.pt`` to the same manifest.
- Checkpoints from before the binding (no digest in ``ml.pt``) still load, and an ``ml.pt`` of
  another step among them is still found (its step, the manifest's and the folder's must agree).
- The folder's files are held open from the moment they verified: a run still training removes it
  (retention after its next save) before the shards are read, and resume's load and export's
  streaming read the checkpoint that verified all the same.
- A checkpoint removed while resume or ``ml export`` is reading it sends them back to the newest.
"""

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.state import State
from ml.errors import DamagedCheckpointError, UserError
from ml.run.checkpoints import newest_verified_checkpoint, sha256_file
from ml.run.layout import RunDir
from ml.utils.checkpoint import read_checkpoint, verify_checkpoint
from ml.utils.sharded import model_tensor_specs, stream_model_tensors
from tests.same import assert_same
from tests.tiny import make_parts, train_steps


def _saving_run(exp_dir: Path, seed: int = 0, **checkpoint: object) -> tuple:
    """A trainer saving sharded checkpoints of a tiny model in ``exp_dir``, with a run config (for
    ``ml export``), and its model, task, optimizer, schedule and state."""
    torch.manual_seed(seed)
    trainer, model, task, optim, sched = make_parts(exp_dir, format="sharded", **checkpoint)
    trainer.set_run_config(OmegaConf.create({"model": {"name": "tiny"}, "trainer": dict(trainer.config)}))
    state = State.init_state()
    train_steps(model, task, optim, sched, state, 3)
    return trainer, model, task, optim, sched, state


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _strip_binding(folder: Path) -> None:
    """``ml.pt`` as written before it held its manifest's SHA-256 (saved again, without ml's checksum)."""
    extras = torch.load(folder / "ml.pt", weights_only=True)
    del extras["manifest_sha256"]
    torch.save(extras, folder / "ml.pt")


def test_an_ml_pt_from_another_step_makes_the_folder_damaged(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ml.tools.export import main

    trainer, model, task, optim, sched, state = _saving_run(tmp_path, only_save_most_recent=False)
    trainer.save_checkpoint(state, task, model, optim, sched)
    older = _weights(model)
    train_steps(model, task, optim, sched, state, 1)
    trainer.save_checkpoint(state, task, model, optim, sched)
    run = RunDir(tmp_path)
    shutil.copyfile(run.sharded_checkpoint(3) / "ml.pt", run.sharded_checkpoint(4) / "ml.pt")

    with pytest.raises(DamagedCheckpointError, match=r"ml\.pt says step 3, ml-manifest\.json says step 4"):
        read_checkpoint(run.link)
    found = newest_verified_checkpoint(run, read_checkpoint)  # what resume does
    assert found is not None and found.checkpoint.step == 3
    assert "of different saves" in found.warnings[0]
    trainer2, model2, task2, optim2, sched2 = make_parts(tmp_path / "b", format="sharded")
    assert trainer2.load_checkpoint(found.value, task2, model2, optim2, sched2).num_steps == 3
    assert_same(model2.state_dict(), older, "model")

    out = tmp_path / "m.safetensors"
    with pytest.raises(UserError) as refused:  # asked for by name: refused, in one line
        main([str(tmp_path), "-o", str(out), "--checkpoint", "4"])
    assert "of different saves" in str(refused.value) and "\n" not in str(refused.value)
    assert not out.exists()
    assert main([str(tmp_path), "-o", str(out)]) == 0  # the newest that verifies: step 3's
    assert_same(load_file(out), older, "export")


def test_an_ml_pt_of_another_save_of_the_same_step_makes_the_folder_damaged(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _saving_run(tmp_path / "a")
    ours = trainer.save_checkpoint(state, task, model, optim, sched)
    trainer._last_ckpt_step = -1  # saved again (the final metrics): the new ml.pt holds the same binding
    assert trainer.save_checkpoint(state, task, model, optim, sched) == ours
    extras = torch.load(ours / "ml.pt", weights_only=True)
    assert extras["manifest_sha256"] == sha256_file(ours / "ml-manifest.json")
    assert "manifest_sha256" not in read_checkpoint(ours)  # checked and dropped: not part of the state

    trainer_b, model_b, task_b, optim_b, sched_b, state_b = _saving_run(tmp_path / "b", seed=1)
    theirs = trainer_b.save_checkpoint(state_b, task_b, model_b, optim_b, sched_b)
    shutil.copyfile(theirs / "ml.pt", ours / "ml.pt")  # step 3 too, of other shards
    with pytest.raises(DamagedCheckpointError, match=r"its ml\.pt was written with other shards"):
        read_checkpoint(ours)
    with pytest.raises(DamagedCheckpointError, match=r"its ml\.pt was written with other shards"):
        verify_checkpoint(ours)


def test_checkpoints_from_before_the_binding_still_load_and_are_checked_by_step(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _saving_run(tmp_path, only_save_most_recent=False)
    trainer.save_checkpoint(state, task, model, optim, sched)
    train_steps(model, task, optim, sched, state, 1)
    trainer.save_checkpoint(state, task, model, optim, sched)
    run = RunDir(tmp_path)
    for step in (3, 4):
        _strip_binding(run.sharded_checkpoint(step))
    trainer2, model2, task2, optim2, sched2 = make_parts(tmp_path / "b", format="sharded")
    assert trainer2.load_checkpoint(run.link, task2, model2, optim2, sched2).num_steps == 4
    assert_same(model2.state_dict(), model.state_dict(), "model")

    shutil.copyfile(run.sharded_checkpoint(3) / "ml.pt", run.sharded_checkpoint(4) / "ml.pt")
    with pytest.raises(DamagedCheckpointError, match=r"ml\.pt says step 3, ml-manifest\.json says step 4"):
        read_checkpoint(run.sharded_checkpoint(4))


def test_a_checkpoint_removed_after_it_verified_is_read_as_it_verified(tmp_path: Path) -> None:
    """Resume's load and export's streaming read what verified, though the run's next save removed
    the folder in between (retention: the folder is gone by the time the shards are read)."""
    trainer, model, task, optim, sched, state = _saving_run(tmp_path)
    folder = trainer.save_checkpoint(state, task, model, optim, sched)
    saved, saved_optim = _weights(model), copy.deepcopy(optim.state_dict())
    ckpt = read_checkpoint(trainer.ckpt_path)  # verified: its files are held from here on
    exported = read_checkpoint(trainer.ckpt_path)["model"]
    train_steps(model, task, optim, sched, state, 1)
    trainer.save_checkpoint(state, task, model, optim, sched)  # the run goes on: ckpt.3 is removed
    assert not folder.exists() and os.readlink(trainer.ckpt_path) == "ckpt.4"

    trainer2, model2, task2, optim2, sched2 = make_parts(tmp_path / "b", format="sharded")
    assert trainer2.load_checkpoint(ckpt, task2, model2, optim2, sched2).num_steps == 3
    assert_same(model2.state_dict(), saved, "model")
    assert_same(optim2.state_dict(), saved_optim, "optim")
    specs = model_tensor_specs(exported)  # ml export's read: the metadata, then one tensor at a time
    assert_same(dict(stream_model_tensors(exported, specs)), saved, "export")


def test_a_checkpoint_removed_while_the_newest_is_looked_for_sends_the_search_back_to_the_newest(
    tmp_path: Path,
) -> None:
    trainer, model, task, optim, sched, state = _saving_run(tmp_path)
    trainer.save_checkpoint(state, task, model, optim, sched)
    run = RunDir(tmp_path)
    read: list[Path] = []

    def read_while_the_run_saves(path: Path) -> dict:
        target = path.resolve()  # what ml export reads: the link's target when it looked
        if not read:  # the run saves its next checkpoint meanwhile, and its retention removes this one
            train_steps(model, task, optim, sched, state, 1)
            trainer.save_checkpoint(state, task, model, optim, sched)
        read.append(target)
        return read_checkpoint(target)

    found = newest_verified_checkpoint(run, read_while_the_run_saves)
    assert found is not None and found.checkpoint.step == 4 and not found.warnings
    assert [p.name for p in read] == ["ckpt.3", "ckpt.4"]
    assert State.from_json(found.value["state"]).num_steps == 4


def test_reading_and_closing_a_sharded_checkpoint_leaves_no_file_open(tmp_path: Path) -> None:
    from ml.utils.checkpoint import close_checkpoint

    trainer, model, task, optim, sched, state = _saving_run(tmp_path)
    trainer.save_checkpoint(state, task, model, optim, sched)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        close_checkpoint(read_checkpoint(trainer.ckpt_path))
        verify_checkpoint(trainer.ckpt_path)
    assert len(os.listdir("/proc/self/fd")) == before
