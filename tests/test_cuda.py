"""What only a CUDA GPU can show: mixed precision, compilation, asynchronous saves from GPU memory,
bit-exact resume, torch's fused AdamW step, and checkpoints read onto another device than the model's.

Every test here is marked ``cuda`` (skipped without a GPU; ``scripts/gpu_check.sh`` runs them) and
takes seconds on one GPU: the digits task with small models, tens of steps, in this process.
"""

import copy
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.compose import build_objects, compose_config
from ml.core.state import State
from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers.builtin import AdamConfig, AdamOptimizer, weight_decay_param_groups
from ml.tasks.sl import SupervisedLearningTaskConfig
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from tests.tiny import TinyModel, TinyModelConfig, TinyTask, make_parts, train_steps

pytestmark = pytest.mark.cuda

DIGITS_SMALL = [
    "model.channels=8",
    "model.hidden=32",
    "task.max_steps=60",
    "optimizer.lr=5e-3",
    "lr_scheduler.warmup_steps=5",
]
SMALL = [  # on the GPU, short: no validation, no periodic checkpoint, a jsonl log of every step
    "trainer.device=cuda",
    "trainer.valid_every_n_steps=null",
    "trainer.valid_at_end=false",
    "trainer.progress_bar=false",
    "trainer.checkpoint.save_every_n_steps=null",
    "logger=[{name: jsonl, write_every_n_steps: 1}]",
]


@pytest.fixture(autouse=True)
def _flags_restored() -> Iterator[None]:
    """Whatever a test (or a trainer) changes of torch's global numerics flags is put back."""
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[1], flags[2]


LossHook = Callable[[Any, Any, State, Any], None]


def _train(
    exp_dir: Path, *overrides: str, hook: LossHook | None = None, config: str = "digits"
) -> tuple[SupervisedLearningTrainer, Any]:
    """Trains ``config`` (small) with ``overrides`` in ``exp_dir``; ``hook`` sees each loss's inputs."""
    small = [*DIGITS_SMALL, *SMALL] if config == "digits" else SMALL  # the digits example's CNN, small
    root = compose_config([config], [f"trainer.exp_dir={exp_dir}", *small, *overrides])
    objects = build_objects(root)
    if hook is not None:
        task, compute_loss = objects.task, objects.task.compute_loss

        def hooked(model: Any, batch: Any, state: State, output: Any) -> Any:
            hook(model, batch, state, output)
            return compute_loss(model, batch, state, output)

        task.compute_loss = hooked
    trainer = SupervisedLearningTrainer(root.trainer)
    trainer.set_run_config(root)
    trainer.add_loggers(objects.loggers)
    trainer.train(objects.model, objects.task, objects.optimizer, objects.lr_scheduler)
    return trainer, objects


def _losses(exp_dir: Path) -> list[float]:
    lines = (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["metrics"]["train/loss"] for r in records if r["phase"] == "train"]


def _checkpoint(exp_dir: Path) -> dict[str, Any]:
    return torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True, map_location="cpu")


def _assert_equal_trees(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), (
            f"{where}: differs by {(a.cpu().double() - b.cpu().double()).abs().max()}"
        )
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_trees(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_trees(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_digits_trains_in_mixed_precision_and_its_loss_falls(tmp_path: Path, precision: str) -> None:
    trainer, objects = _train(tmp_path, f"trainer.precision={precision}")
    losses = _losses(tmp_path)
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5, losses
    assert trainer.device.type == "cuda"
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in objects.model.parameters())
    ckpt = _checkpoint(tmp_path)
    assert ("grad_scaler" in ckpt) == (precision == "fp16")  # fp16's loss scale is saved, to resume with it


def test_digits_trains_through_torch_compile(tmp_path: Path) -> None:
    _train(tmp_path, "trainer.compile_model=true", "task.max_steps=40")
    losses = _losses(tmp_path)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert not any(key.startswith("_orig_mod.") for key in _checkpoint(tmp_path)["model"])


@pytest.mark.parametrize(
    ("configured", "said"), [("null", "run in full float32"), ("high", "TF32 tensor cores")]
)
def test_tf32_matmuls_are_the_config_s_choice_and_said_at_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, configured: str, said: str
) -> None:
    torch.set_float32_matmul_precision("highest")  # torch's default (the fixture restores the flags)
    tf32: set[bool] = set()

    def look(model: Any, batch: Any, state: State, output: Any) -> None:
        del model, batch, state, output
        tf32.add(torch.backends.cuda.matmul.allow_tf32)

    caplog.set_level("INFO", logger="ml")
    _train(tmp_path, "task.max_steps=3", f"trainer.float32_matmul_precision={configured}", hook=look)
    assert tf32 == {configured == "high"}
    assert not torch.backends.cuda.matmul.allow_tf32  # restored after the run
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("float32 matmuls on cuda")]
    assert said in line


def test_an_asynchronous_save_from_gpu_memory_holds_the_step_s_exact_state(tmp_path: Path) -> None:
    """The background write copies GPU tensors to pinned host buffers: the file holds exactly the
    weights and moments of its step, though training changed them in place meanwhile."""
    saved: dict[int, dict[str, torch.Tensor]] = {}

    def remember(model: Any, batch: Any, state: State, output: Any) -> None:
        del batch, output
        if state.training and state.num_steps in (20, 40):  # the weights after that many steps
            saved[state.num_steps] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    _train(
        tmp_path,
        "task.max_steps=41",
        "trainer.checkpoint.async_save=true",
        "trainer.checkpoint.save_every_n_steps=20",
        "trainer.checkpoint.only_save_most_recent=false",
        hook=remember,
    )
    for step in (20, 40):
        ckpt = torch.load(tmp_path / "checkpoints" / f"ckpt.{step}.pt", weights_only=True, map_location="cpu")
        _assert_equal_trees(ckpt["model"], saved[step], f"ckpt.{step}.pt model")
        assert all(len(s) and s["exp_avg"].abs().sum() > 0 for s in ckpt["optim"]["state"].values())
    # And it resumes: the run continues from its newest checkpoint, on the GPU.
    _train(tmp_path, "task.max_steps=45", "trainer.checkpoint.async_save=true")
    assert json.loads(_checkpoint(tmp_path)["state"])["num_steps"] == 45 and len(_losses(tmp_path)) == 45


def test_a_deterministic_run_stopped_by_sigterm_resumes_bit_exactly(tmp_path: Path) -> None:
    """digits' CNN (convolutions, dropout: the CUDA generator too) with ``trainer.deterministic``."""
    common = ["trainer.deterministic=true", "task.max_steps=30", "model.dropout=0.25"]
    _train(tmp_path / "whole", *common)

    def stop_at_12(model: Any, batch: Any, state: State, output: Any) -> None:
        del model, batch, output
        if state.training and state.num_steps == 12:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped, _ = _train(tmp_path / "resumed", *common, hook=stop_at_12)
    assert stopped.stop_signal == signal.SIGTERM and not stopped.finished
    assert json.loads(_checkpoint(tmp_path / "resumed")["state"])["num_steps"] == 13
    assert len(_losses(tmp_path / "resumed")) == 13
    _train(tmp_path / "resumed", *common)  # continues from the checkpoint of step 13
    whole, resumed = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "resumed")
    for key in ("model", "optim"):
        _assert_equal_trees(whole[key], resumed[key], key)
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "resumed")


def test_the_fast_fused_adamw_steps_as_torch_s_adamw_fused_step_for_step(tmp_path: Path) -> None:
    """``trainer.fast_optimizer`` on CUDA: torch's own fused AdamW step, bit for bit, every step.

    The trainer's run records each step's batch and the weights its forward pass sees (the weights
    after the previous step); a plain loop then takes ``AdamW(fused=True)`` steps on the same batches
    from the same initial weights, and must see the same weights before every step and after the last.
    """
    batches: list[Any] = []
    seen: list[dict[str, torch.Tensor]] = []

    def record(model: Any, batch: Any, state: State, output: Any) -> None:
        del output
        if state.training:
            batches.append([t.detach().clone() for t in batch])
            seen.append({k: v.detach().clone() for k, v in model.named_parameters()})

    config = tmp_path / "mlp.yaml"  # an MLP without dropout: the loop below draws no random numbers
    config.write_text(
        "model: {name: digits_mlp, hidden: 32, num_layers: 2, dropout: 0.0}\n"
        "task: {name: digits, max_steps: 12, train_dl: {batch_size: 64}}\n"
        "optimizer: {name: adamw, lr: 1e-3, weight_decay: 0.1}\n"
        "lr_scheduler: {name: constant}\n"
        "trainer: {name: sl, deterministic: true, fast_optimizer: true}\n"
    )
    _, objects = _train(tmp_path / "run", hook=record, config=str(config))
    groups = _checkpoint(tmp_path / "run")["optim"]["param_groups"]
    assert all(g["fused"] for g in groups), groups
    final = {k: v.detach().clone() for k, v in objects.model.named_parameters()}

    model = copy.deepcopy(objects.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(seen[0][name])
    cfg = objects.optimizer.config
    optim = torch.optim.AdamW(
        weight_decay_param_groups(model, cfg.weight_decay, cfg.default_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True,
    )
    model.train()
    torch.use_deterministic_algorithms(True)
    for step, batch in enumerate(batches):
        _assert_equal_trees(dict(model.named_parameters()), seen[step], f"before step {step + 1}")
        task = objects.task  # its own compute_loss, not the recording one
        loss = type(task).compute_loss(task, model, batch, State.init_state(), model(batch[0]))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    _assert_equal_trees(dict(model.named_parameters()), final, "after the last step")


def _tiny_run(exp_dir: Path, fast: bool, deterministic: bool = True) -> dict[str, torch.Tensor]:
    """tests/optimizers/test_fast.py's comparison, on the GPU: three steps of the tiny BatchNorm MLP."""
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {
            "name": "sl",
            "exp_dir": str(exp_dir),
            "device": "cuda",
            "fast_optimizer": fast,
            "valid_at_end": False,
            "deterministic": deterministic,
        },
    )
    trainer = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = TinyModel(TinyModelConfig(name="tiny"))
    task = TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=3))
    trainer.train(
        model,
        task,
        AdamOptimizer(AdamConfig(name="adam", lr=1e-2)),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def test_fused_and_multi_tensor_adam_agree_on_the_gpu_in_full_float32(tmp_path: Path) -> None:
    """What tests/optimizers/test_fast.py checks on the CPU, with every source of difference but the
    optimizer's own rounding taken away: TF32 off, deterministic kernels. A failure says which is
    left: the same fused run twice differing means non-deterministic kernels; agreeing, while fused
    and multi-tensor part by more than rounding, means the two optimizer paths compute differently."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fused = _tiny_run(tmp_path / "fused", fast=True)
    again = _tiny_run(tmp_path / "again", fast=True)
    plain = _tiny_run(tmp_path / "plain", fast=False)
    _assert_equal_trees(fused, again, "the same fused run twice")
    differences = {name: (fused[name] - plain[name]).abs().max().item() for name in fused}
    # net.0.bias feeds BatchNorm: its gradient is 0 but for rounding, which Adam makes whole steps of.
    assert all(d <= 1e-6 for name, d in differences.items() if name != "net.0.bias"), differences


def test_a_checkpoint_read_onto_the_gpu_restores_optimizer_state_where_the_parameters_are(
    tmp_path: Path,
) -> None:
    """trainer.device is the GPU, the model stays on the CPU: the moments and step counts land on
    the CPU beside their parameters, as they were saved (torch leaves a read ``step`` where it is)."""
    torch.manual_seed(0)
    trainer, model, task, optim, sched = make_parts(tmp_path / "cpu")
    assert trainer.device.type == "cuda"
    train_steps(model, task, optim, sched, State.init_state(), 3)
    path = trainer.save_checkpoint(State(num_steps=3), task, model, optim, sched)
    trainer2, model2, task2, optim2, sched2 = make_parts(tmp_path / "cpu")
    trainer2.load_checkpoint(path, task2, model2, optim2, sched2)  # read with map_location=cuda
    _assert_equal_trees(optim.state_dict(), optim2.state_dict(), "optim")
    train_steps(model2, task2, optim2, sched2, State(num_steps=3), 1)  # and it steps


@pytest.mark.parametrize("fused", [False, True])
def test_a_resumed_optimizer_keeps_its_step_counts_where_a_fresh_one_does(
    tmp_path: Path, fused: bool
) -> None:
    """On the GPU, a plain AdamW counts steps on the CPU (a device count would be read back at every
    step), a fused one on the GPU: after a resume too."""
    torch.manual_seed(0)
    trainer, model, task, _, sched = make_parts(tmp_path)
    model.cuda()
    task.cuda()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    x = torch.randn(4, 4, device="cuda")
    model(x).sum().backward()
    optim.step()
    fresh = {p["step"].device.type for p in optim.state.values()}
    assert fresh == {"cuda" if fused else "cpu"}
    path = trainer.save_checkpoint(State(num_steps=1), task, model, optim)
    again = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    trainer.load_checkpoint(path, task, model, again)
    assert {p["step"].device.type for p in again.state.values()} == fresh
    assert {p["exp_avg"].device.type for p in again.state.values()} == {"cuda"}
    del sched


def test_rank_0_s_buffers_reach_every_process_over_nccl_even_when_not_contiguous(tmp_path: Path) -> None:
    """NCCL broadcasts only contiguous tensors (gloo copies itself): a transposed buffer, which the
    CPU tests cannot catch, made every FSDP evaluation and checkpoint fail on GPUs."""
    import torch.distributed as dist
    from torch import nn

    from ml.trainers.parallel import share_rank_0_buffers

    module = nn.Module().cuda()
    module.register_buffer("transposed", torch.arange(6.0, device="cuda").view(2, 3).t())
    module.register_buffer("stats", torch.ones(3, device="cuda"))
    before = {name: t.clone() for name, t in module.named_buffers()}
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        share_rank_0_buffers(module)
    finally:
        dist.destroy_process_group()
    for name, tensor in module.named_buffers():
        assert torch.equal(tensor, before[name]), name
    assert not module.transposed.is_contiguous()  # still the module's own tensor, filled in place


NOISY = """\
model: {name: "tests.e2e.resume_task:DropoutBNModel", hidden: 16, dropout: 0.2}
task:
  name: "tests.e2e.resume_task:IndexedTask"
  num_samples: 96
  max_steps: 20
  augment_noise: 0.1
  train_dl: {batch_size: 8, num_workers: 0, shuffle: true}
optimizer: {name: adamw, lr: 1e-2}
lr_scheduler: {name: constant}
trainer: {name: sl, deterministic: true}
"""


def test_a_dataset_that_draws_random_numbers_resumes_bit_exactly_on_the_gpu(tmp_path: Path) -> None:
    """Without workers a dataset's augmentation draws from the generators a checkpoint saves; on CUDA
    the next step's batch was fetched before this step's checkpoint (to copy it early), so the resumed
    run drew it again from a later state."""
    config = tmp_path / "noisy.yaml"
    config.write_text(NOISY)
    _train(tmp_path / "whole", config=str(config))

    def stop_at_7(model: Any, batch: Any, state: State, output: Any) -> None:
        del model, batch, output
        if state.training and state.num_steps == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped, _ = _train(tmp_path / "resumed", config=str(config), hook=stop_at_7)
    assert stopped.stop_signal == signal.SIGTERM and not stopped.finished
    _train(tmp_path / "resumed", config=str(config))
    whole, resumed = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "resumed")
    assert json.loads(resumed["state"])["num_steps"] == 20
    for key in ("model", "optim"):
        _assert_equal_trees(whole[key], resumed[key], key)
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "resumed")


def test_generators_saved_where_more_gpus_were_visible_are_restored_on_those_visible_now() -> None:
    """A checkpoint from a machine with more GPUs visible failed to resume (set_rng_state_all), and
    the GPU trained on may have another number now (CUDA_VISIBLE_DEVICES)."""
    from ml.utils.checkpoint import get_rng_state, set_rng_state

    torch.cuda.manual_seed(1)
    state = get_rng_state()
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(2)
    other = torch.cuda.get_rng_state()
    # Saved where the GPU trained on was another's number: the process's own generator goes to it.
    state["cuda"] = [other, *[other.clone() for _ in state["cuda"]]]
    set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), expected)
