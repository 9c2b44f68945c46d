"""Sharded checkpoints in one process (``trainer.checkpoint.format=sharded``): real DCP files.

- A sharded checkpoint is a folder ``ckpt.<step>/`` that the link names; it round-trips the model,
  the optimizer, the schedule, the task and the generators exactly, into the trainer's
  ``load_checkpoint`` and from ``ml export``.
- It is a candidate as a file is (:mod:`ml.run.checkpoints`): a newer unlinked folder wins, a
  damaged one (a shard gone, truncated or with a byte changed - the manifest's SHA-256 - no
  manifest) is skipped for the one before, saying so, by resume and ``ml export``; exporting it by
  name is one line, exit 2; a manifest from before digests is accepted by its sizes;
  an unfinished ``ckpt.<step>.tmp/`` is never a candidate and goes with retention; files and
  folders of one run mix (a run that switched format).
- Nothing read from it runs code: a ``.metadata`` pickle naming anything but DCP's classes is
  refused, and so are pieces outside the folder.
- An asynchronous save writes the state as it was when the save began, whatever training does meanwhile.
- FSDP2 in one real (gloo, world size 1) process group: mixed precision, activation checkpointing
  of the model's shard units, the hybrid (2-D) mesh, and a sharded save from it that loads into a
  plain model. The mesh shapes of hybrid sharding.
"""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ml.core.state import State
from ml.errors import CheckpointError, ConfigError, DamagedCheckpointError, UnsafeCheckpointError
from ml.models.base import BaseModel, BaseModelConfig
from ml.run.checkpoints import checkpoint_candidates, newest_verified_checkpoint, sha256_file
from ml.run.layout import RunDir
from ml.trainers.parallel import (
    fsdp_mesh_shape,
    full_optim_state,
    load_full_optim_state,
    wrap_model,
)
from ml.utils.checkpoint import ShardedState, read_checkpoint, verify_checkpoint
from ml.utils.sharded import load_sharded_model, save_shards
from tests.same import assert_same
from tests.tiny import make_parts, train_steps


def _trained(exp_dir: Path, steps: int = 3, **checkpoint: object) -> tuple:
    torch.manual_seed(0)
    parts = make_parts(exp_dir, format="sharded", **checkpoint)
    _, model, task, optim, sched = parts
    state = State.init_state()
    train_steps(model, task, optim, sched, state, steps)
    return (*parts, state)


def test_a_sharded_checkpoint_round_trips_everything_exactly(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _trained(tmp_path)
    path = trainer.save_checkpoint(state, task, model, optim, sched)
    assert path == tmp_path / "checkpoints" / "ckpt.3" and path.is_dir()
    assert os.readlink(trainer.ckpt_path) == "ckpt.3"
    names = {p.name for p in path.iterdir()}
    shards = {n for n in names if n.endswith(".distcp")}  # one per writing thread
    assert names - shards == {".metadata", "ml-manifest.json", "ml.pt"} and "__0_0.distcp" in shards
    after_save = torch.rand(3)

    torch.manual_seed(1)  # other weights, moments and generators
    trainer2, model2, task2, optim2, sched2 = make_parts(tmp_path, format="sharded")
    train_steps(model2, task2, optim2, sched2, State.init_state(), 1)
    loaded = trainer2.load_checkpoint(trainer.ckpt_path, task2, model2, optim2, sched2)
    assert loaded == state
    assert_same(model2.state_dict(), model.state_dict(), "model")
    assert_same(optim2.state_dict(), optim.state_dict(), "optim")
    assert sched2.state_dict() == sched.state_dict()
    assert torch.equal(task2.seen, task.seen)
    assert torch.equal(torch.rand(3), after_save)

    ckpt = read_checkpoint(path)  # tensors stay in the folder until loaded
    assert isinstance(ckpt["model"], ShardedState) and isinstance(ckpt["optim"], ShardedState)
    assert verify_checkpoint(trainer.ckpt_path)  # ml.pt's own checksum


def test_the_same_step_saved_again_keeps_its_shards_and_replaces_ml_pt(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _trained(tmp_path)
    path = trainer.save_checkpoint(state, task, model, optim, sched)
    shard = (path / "__0_0.distcp").stat()
    trainer._last_ckpt_step = -1  # saved again, e.g. with the final metrics
    task.seen += 1000
    assert trainer.save_checkpoint(state, task, model, optim, sched) == path
    assert (path / "__0_0.distcp").stat().st_ino == shard.st_ino  # the same file, not rewritten
    assert int(read_checkpoint(path)["task"]["seen"]) == int(task.seen)


def test_a_folder_of_the_step_the_link_does_not_name_is_written_anew(tmp_path: Path) -> None:
    """A damaged ckpt.3 an earlier process left (resume skipped it): saving step 3 replaces it whole."""
    trainer, model, task, optim, sched, state = _trained(tmp_path, only_save_most_recent=False)
    path = trainer.save_checkpoint(state, task, model, optim, sched)
    shard = path / "__0_0.distcp"
    os.truncate(shard, 10)
    trainer.ckpt_path.unlink()
    trainer._last_ckpt_step = -1
    assert trainer.save_checkpoint(state, task, model, optim, sched) == path
    assert verify_checkpoint(path) and shard.stat().st_size > 10
    fresh = make_parts(tmp_path / "x", format="sharded")[1]
    load_sharded_model(fresh, read_checkpoint(path)["model"], strict=True)
    assert_same(fresh.state_dict(), model.state_dict(), "model")


def test_strict_loading_names_the_keys_that_do_not_fit(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _trained(tmp_path)
    trainer.save_checkpoint(state, task, model, optim, sched)
    other = nn.Sequential(nn.Linear(4, 8))
    part = read_checkpoint(trainer.ckpt_path)["model"]
    with pytest.raises(CheckpointError, match=r"missing keys: 0\.bias, 0\.weight; unexpected keys: net\.0"):
        load_sharded_model(other, part, strict=True)
    bigger = make_parts(tmp_path / "b", format="sharded")[1]
    bigger.net[3] = nn.Linear(8, 5)
    with pytest.raises(CheckpointError, match=r"shapes differ: net\.3\.weight \(3, 8\) vs \(5, 8\)"):
        load_sharded_model(bigger, part, strict=True)
    notes = load_sharded_model(bigger, part, strict=False)  # what fits, and the rest named
    assert notes == ["not loaded, shapes differ: net.3.weight (3, 8) vs (5, 8), net.3.bias (3,) vs (5,)"]
    assert torch.equal(bigger.net[0].weight, model.net[0].weight)


def test_folders_are_candidates_as_files_are(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _trained(tmp_path, only_save_most_recent=False)
    run = RunDir(tmp_path)
    trainer.save_checkpoint(state, task, model, optim, sched)
    train_steps(model, task, optim, sched, state, 1)
    trainer.save_checkpoint(state, task, model, optim, sched)  # ckpt.4
    # A run killed before its link swap: ckpt.5 complete beside the link naming ckpt.4.
    train_steps(model, task, optim, sched, state, 1)
    trainer.save_checkpoint(state, task, model, optim, sched)
    run.link.unlink()
    run.link.symlink_to("ckpt.4")
    (run.checkpoints / "ckpt.6.tmp").mkdir()  # a save a kill interrupted: never a candidate
    assert [(c.step, c.unlinked) for c in checkpoint_candidates(run)] == [(5, True), (4, False), (3, False)]

    # Damage: ckpt.5 loses a byte of its shard, ckpt.4 its manifest: resume takes ckpt.3.
    shard = run.sharded_checkpoint(5) / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size - 1)
    (run.sharded_checkpoint(4) / "ml-manifest.json").unlink()
    found = newest_verified_checkpoint(run, verify_checkpoint)
    assert found is not None and found.checkpoint.step == 3
    assert "__0_0.distcp has" in found.warnings[0] and "no ml-manifest.json" in found.warnings[0]
    with pytest.raises(DamagedCheckpointError, match="is missing"):
        (run.sharded_checkpoint(3) / "__0_0.distcp").rename(run.checkpoints / "elsewhere")
        verify_checkpoint(run.sharded_checkpoint(3))


def test_retention_removes_older_folders_files_and_unfinished_writes(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _trained(tmp_path)
    run = RunDir(tmp_path)
    full = make_parts(tmp_path)[0]  # the same run, saving files (format=full)
    full.save_checkpoint(state, task, model, optim, sched)
    assert os.readlink(run.link) == "ckpt.3.pt"
    (run.checkpoints / "ckpt.2.tmp").mkdir()
    trainer.save_checkpoint(state, task, model, optim, sched)  # the same step, now sharded
    assert sorted(os.listdir(run.checkpoints)) == ["ckpt.3", "ckpt.pt"]
    assert os.readlink(run.link) == "ckpt.3"


def test_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _trained(tmp_path)
    path = trainer.save_checkpoint(state, task, model, optim, sched)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    metadata = path / ".metadata"
    size = metadata.stat().st_size
    metadata.write_bytes(pickle.dumps(Evil()).ljust(size))  # the manifest's size still fits
    _rewrite_manifest(path, ".metadata")  # the digest is against damage: whoever can write can rehash
    fresh = make_parts(tmp_path / "x", format="sharded")[1]
    with pytest.raises(
        UnsafeCheckpointError, match=rf"{re.escape(str(path))}: its \.metadata names (posix|os)\.system"
    ):
        load_sharded_model(fresh, read_checkpoint(path)["model"], strict=True)
    assert not marker.exists()


def test_an_async_save_writes_the_state_of_its_step(tmp_path: Path) -> None:
    trainer, model, task, optim, sched, state = _trained(tmp_path, async_save=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    path = trainer.save_checkpoint(state, task, model, optim, sched)
    with torch.no_grad():  # training goes on while the shards are written
        for p in model.parameters():
            p.add_(1.0)
    assert trainer.wait_for_checkpoint() == path
    fresh = make_parts(tmp_path / "x", format="sharded")[1]
    load_sharded_model(fresh, read_checkpoint(path)["model"], strict=True)
    assert_same(fresh.state_dict(), expected, "model")


def _rewrite_manifest(folder: Path, name: str) -> None:
    """The manifest made to agree with ``name`` as it is now, and ml.pt with the manifest (a SHA-256
    is no signature: ml.pt is saved again without one)."""
    manifest = json.loads((folder / "ml-manifest.json").read_text())
    manifest["sha256"][name] = sha256_file(folder / name)
    (folder / "ml-manifest.json").write_text(json.dumps(manifest))
    extras = torch.load(folder / "ml.pt", weights_only=True)
    extras["manifest_sha256"] = sha256_file(folder / "ml-manifest.json")
    torch.save(extras, folder / "ml.pt")


def _flip_byte(path: Path, offset: int | None = None) -> None:
    """One byte changed in place (the middle by default): the size stays."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _two_saved(tmp_path: Path) -> tuple:
    """ckpt.3 and ckpt.4 (older ones kept), with a run config, as a trained run leaves them."""
    trainer, model, task, optim, sched, state = _trained(tmp_path, only_save_most_recent=False)
    trainer.set_run_config(OmegaConf.create({"model": {"name": "tiny"}, "trainer": dict(trainer.config)}))
    trainer.save_checkpoint(state, task, model, optim, sched)
    older = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, task, optim, sched, state, 1)
    trainer.save_checkpoint(state, task, model, optim, sched)
    return trainer, RunDir(tmp_path), older


def test_a_byte_changed_in_a_shard_is_found_and_resume_takes_the_older_checkpoint(tmp_path: Path) -> None:
    _, run, older = _two_saved(tmp_path)
    newest = run.sharded_checkpoint(4)
    manifest = json.loads((newest / "ml-manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"]) and ".metadata" in manifest["sha256"]
    assert manifest["sha256"]["__0_0.distcp"] == sha256_file(newest / "__0_0.distcp")
    verify_checkpoint(newest)  # intact: verifies and loads
    fresh = make_parts(tmp_path / "x", format="sharded")[1]
    load_sharded_model(fresh, read_checkpoint(newest)["model"], strict=True)

    for offset in (None, 0):  # a tensor's byte, then the archive's header (DCP could not read it)
        _flip_byte(newest / "__0_0.distcp", offset)
        with pytest.raises(DamagedCheckpointError, match=r"__0_0\.distcp does not match the SHA-256"):
            read_checkpoint(newest)
        found = newest_verified_checkpoint(run, read_checkpoint)  # what resume does
        assert found is not None and found.checkpoint.step == 3
        assert f"skipping {newest}" in found.warnings[0] and "does not match the SHA-256" in found.warnings[0]
        assert found.warnings[0].endswith(
            f"using {run.sharded_checkpoint(3)}, the newest checkpoint that verifies"
        )
        _flip_byte(newest / "__0_0.distcp", offset)  # back as it was
    trainer2, model2, task2, optim2, sched2 = make_parts(tmp_path / "y", format="sharded")
    _flip_byte(newest / "__0_0.distcp")
    found = newest_verified_checkpoint(run, read_checkpoint)
    assert found is not None
    trainer2.load_checkpoint(found.value, task2, model2, optim2, sched2)
    assert_same(model2.state_dict(), older, "model")


def test_ml_export_of_a_damaged_sharded_checkpoint_is_one_line(tmp_path: Path) -> None:
    """Named: one line, exit 2; the newest (by default): the older one, with a warning."""
    from safetensors.torch import load_file

    _, run, older = _two_saved(tmp_path)
    _flip_byte(run.sharded_checkpoint(4) / "__0_0.distcp")
    out = tmp_path / "m.safetensors"
    named = subprocess.run(
        [sys.executable, "-m", "ml.cli", "export", str(tmp_path), "-o", str(out), "--checkpoint", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert named.returncode == 2, named.stderr
    assert named.stderr.count("\n") == 1 and "does not match the SHA-256" in named.stderr, named.stderr
    assert not out.exists()

    from ml.tools.export import main

    assert main([str(tmp_path), "-o", str(out)]) == 0
    assert_same(load_file(out), older, "export")


def test_a_manifest_without_digests_is_checked_by_size_and_a_bad_shard_is_one_line(tmp_path: Path) -> None:
    """Manifests written before the digests: accepted by their sizes; what DCP then cannot read is a
    CheckpointError of one line (the export's too), not DCP's exception with every rank's traceback."""
    from ml.errors import UserError
    from ml.tools.export import main

    _, run, _ = _two_saved(tmp_path)
    newest = run.sharded_checkpoint(4)
    manifest = json.loads((newest / "ml-manifest.json").read_text())
    del manifest["sha256"]
    (newest / "ml-manifest.json").write_text(json.dumps(manifest))
    extras = torch.load(newest / "ml.pt", weights_only=True)
    del extras["manifest_sha256"]  # nor did ml.pt hold the manifest's then
    torch.save(extras, newest / "ml.pt")
    verify_checkpoint(newest)
    fresh = make_parts(tmp_path / "x", format="sharded")[1]
    load_sharded_model(fresh, read_checkpoint(newest)["model"], strict=True)

    _flip_byte(newest / "__0_0.distcp", 0)  # the archive's header: unnoticed until DCP reads it
    verify_checkpoint(newest)
    with pytest.raises(UserError) as raised:
        main([str(tmp_path), "-o", str(tmp_path / "m.safetensors")])
    assert f"cannot load the sharded checkpoint {newest}" in str(raised.value)
    assert "\n" not in str(raised.value) and "Traceback" not in str(raised.value)
    assert not (tmp_path / "m.safetensors").exists()


def test_export_streams_the_weights_into_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ml.tools.export import main

    trainer, model, task, optim, sched, state = _trained(tmp_path)
    trainer.set_run_config(OmegaConf.create({"model": {"name": "tiny"}, "trainer": dict(trainer.config)}))
    trainer.save_checkpoint(state, task, model, optim, sched)
    assert main([str(tmp_path), "-o", str(tmp_path / "m.safetensors")]) == 0
    assert_same(load_file(tmp_path / "m.safetensors"), dict(model.state_dict()), "export")


# -- FSDP2 in one process


class Block(nn.Module):
    """A block that counts its forward passes (a recomputation runs it again)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.linear(x))


class Blocks(BaseModel[BaseModelConfig]):
    """Two blocks in a ModuleList: the shard units are the blocks, not the list."""

    def __init__(self) -> None:
        super().__init__(BaseModelConfig(name="blocks"))
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(8, 2)

    def shard_units(self) -> list[nn.Module]:
        return [*self.blocks, self.head]

    @property
    def calls(self) -> int:
        return sum(block.calls for block in self.blocks)  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture
def one_process_group(tmp_path: Path) -> object:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_mixed_precision_activation_checkpointing_and_a_hybrid_mesh(
    one_process_group: object, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = Blocks()
    plain = Blocks()
    plain.load_state_dict(model.state_dict())
    fsdp = SimpleNamespace(param_dtype="bfloat16", reduce_dtype="float32", hybrid=True, shard_size=1)
    wrap_model(model, torch.device("cpu"), "fsdp", fsdp=fsdp, activation_checkpointing=True)
    assert isinstance(model.head.weight, DTensor)
    assert model.head.weight.device_mesh.mesh_dim_names == ("replicate", "shard")  # HSDP's 2-D mesh
    assert model.head.weight.dtype == torch.float32  # kept in fp32, computed in bf16
    out = model(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16
    assert model.calls == 2
    out.float().sum().backward()
    assert model.calls == 4  # each block ran again in the backward pass: its activations were not kept
    assert model.head.weight.grad is not None and model.head.weight.grad.dtype == torch.float32

    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optim.step()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    skeletons, _ = save_shards(folder, model, optim, asynchronous=False)
    part = ShardedState(folder, "model", skeletons["model"])
    load_sharded_model(plain, part, strict=True)  # into a plain model: the whole tensors
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name].full_tensor()), name


def test_the_full_state_of_an_optimizer_that_keeps_none_loads_into_fsdp(one_process_group: object) -> None:
    """SGD without momentum keeps no state: a full checkpoint (trainer.checkpoint.format=full) gives
    its groups' settings back (torch's loader failed: it takes the device from the state's tensors)."""
    from types import SimpleNamespace

    fsdp = SimpleNamespace(param_dtype=None, reduce_dtype=None, hybrid=False, shard_size=None)
    model = wrap_model(Blocks(), torch.device("cpu"), "fsdp", fsdp=fsdp, activation_checkpointing=False)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    optim.step()
    saved = full_optim_state(model, optim)
    assert saved["state"] == {}
    saved["param_groups"][0]["lr"] = 0.025  # as a schedule left it
    load_full_optim_state(model, optim, saved)
    assert optim.param_groups[0]["lr"] == 0.025

    saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][1:]  # one parameter fewer
    with pytest.raises(CheckpointError, match="does not fit the optimizer"):
        load_full_optim_state(model, optim, saved)


def test_hybrid_mesh_shapes() -> None:
    assert fsdp_mesh_shape(8, hybrid=False, shard_size=None, local_world_size=4) == (8,)
    assert fsdp_mesh_shape(8, hybrid=True, shard_size=None, local_world_size=4) == (2, 4)  # 2 nodes of 4
    assert fsdp_mesh_shape(4, hybrid=True, shard_size=2, local_world_size=4) == (2, 2)
    with pytest.raises(ConfigError, match="shard_size=3"):
        fsdp_mesh_shape(8, hybrid=True, shard_size=3, local_world_size=4)


def test_bad_format_and_fsdp_settings_are_refused_in_one_line() -> None:
    from ml.trainers.base import TrainerConfig, check_trainer_config

    def config(**overrides: object) -> TrainerConfig:
        return OmegaConf.merge(OmegaConf.structured(TrainerConfig), overrides)  # type: ignore[return-value]

    with pytest.raises(ConfigError, match=r"checkpoint\.format must be full or sharded"):
        check_trainer_config(config(checkpoint={"format": "zip"}))
    with pytest.raises(ConfigError, match=r"trainer\.fsdp\.param_dtype must be one of"):
        check_trainer_config(config(fsdp={"param_dtype": "bf16"}))
    check_trainer_config(config(checkpoint={"format": "sharded"}, fsdp={"param_dtype": "bfloat16"}))
