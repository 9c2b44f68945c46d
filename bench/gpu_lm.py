"""Training throughput of a GPT-2-small-shaped language model on a GPU: ``ml`` against a plain loop.

The model: a causal transformer of GPT-2 small's shape (12 blocks, width 768, 12 heads, vocabulary
50,304, context 1,024: ~124M weights), pre-norm blocks (LayerNorm, attention through
``F.scaled_dot_product_attention(is_causal=True)``, a 4x GELU MLP), learned positions, the input
embedding tied to the output layer. Random tokens (seeded), batch 16, AdamW (lr 3e-4, weight decay
0.1 on the matrices), bf16 autocast with the loss computed in float32 on float32 logits.

Contenders, each in a fresh interpreter (the smoke run below: all four in one):

* ``plain``: a hand-written loop (a DataLoader over the token tensor, pinned memory, copies
  ``non_blocking``; ``AdamW(fused=True)``; no host sync per step);
* ``ml``: ``ml train`` with ``trainer.precision=bf16`` (its defaults otherwise: the non-finite check
  every step, on the device; the gradient norm when a logger writes; the stdout and jsonl loggers;
  no validation, test or timed
  checkpoint, the final checkpoint after the timed steps);
* ``plain compiled``: the plain loop with the model through ``torch.compile``;
* ``ml compiled``: ``ml train`` with ``trainer.compile_model=true`` too.

Each runs 15 warm-up steps (compilation happens there), then 50 timed steps: the device is
synchronised when the forward pass of step 16 begins and when that of step 66 begins, nowhere in
between (the task's ``run_model`` marks the steps for ``ml``, outside the compiled model).

Reported: tokens/s (batch x context x timed steps / seconds), the ratio to the plain loop run the same
way (``ml`` to ``plain``, ``ml compiled`` to ``plain compiled``), ms per step and
the model FLOPs utilisation: (6 N + 12 L d T) flops per token (N: the weights, the tied embedding
counted once, positions left out; the attention's score and value products counted as if not causal,
PaLM's convention) times tokens/s, over the device's peak dense bf16 rate (NVIDIA's figures without
sparsity): 989 TFLOP/s for an H100 or H200 SXM, 756 for an H100 PCIe, 835 for an H100 NVL or H200
NVL, 312 for an A100; ``--peak-tflops`` for another device.

``python bench/gpu_lm.py`` on a CUDA machine; without CUDA, or with ``--smoke``, a tiny shape (2
blocks, width 64, 4 heads, vocabulary 512, context 64, batch 4, 2 + 3 steps) on the CPU checks the
plumbing in seconds: there ``torch.compile`` runs with its ``eager`` backend (dynamo without code
generation), since building C++ kernels would take far longer than the run.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_results

CONTENDERS = ("plain", "ml", "plain compiled", "ml compiled")
SEED = 0


@dataclass(frozen=True)
class Shape:
    layers: int = 12
    width: int = 768
    heads: int = 12
    vocab: int = 50_304
    context: int = 1_024
    batch: int = 16
    warmup: int = 15
    steps: int = 50


SMOKE = Shape(layers=2, width=64, heads=4, vocab=512, context=64, batch=4, warmup=2, steps=3)
# Dense bf16 TFLOP/s by a part of the device's name, the more specific first (a PCIe or NVL card is
# slower than the SXM one of the same name).
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
}


# -- the model


def make_model(shape: Shape) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(shape.width), nn.LayerNorm(shape.width)
            self.qkv = nn.Linear(shape.width, 3 * shape.width)
            self.proj = nn.Linear(shape.width, shape.width)
            self.up = nn.Linear(shape.width, 4 * shape.width)
            self.down = nn.Linear(4 * shape.width, shape.width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, shape.heads, d // shape.heads).unbind(2)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.down(F.gelu(self.up(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(shape.vocab, shape.width)
            self.pos = nn.Parameter(torch.zeros(shape.context, shape.width))
            self.blocks = nn.ModuleList(Block() for _ in range(shape.layers))
            self.ln = nn.LayerNorm(shape.width)
            self.head = nn.Linear(shape.width, shape.vocab, bias=False)
            self.head.weight = self.embed.weight  # tied
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = (
                        0.02 / math.sqrt(2 * shape.layers)
                        if name.endswith(("proj.weight", "down.weight"))
                        else 0.02
                    )
                    nn.init.normal_(p, std=std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens) + self.pos[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln(x))

    return GPT()


def flops_per_token(shape: Shape, params: int) -> float:
    """6 N for the weights' products (forward and backward) + 12 L d T for attention (PaLM's count)."""
    return 6.0 * params + 12.0 * shape.layers * shape.width * shape.context


def weights(shape: Shape, model: Any) -> int:
    """N: every weight once (the tied embedding once), the positions left out."""
    return sum(p.numel() for p in model.parameters()) - shape.context * shape.width


def tokens(shape: Shape) -> Any:
    """Random token sequences of context + 1 (inputs and next-token targets), one per sample."""
    import torch

    count = (shape.warmup + shape.steps + 1) * shape.batch
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, shape.vocab, (count, shape.context + 1), generator=g)


def lm_loss(logits: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# -- timing: the device synchronised at two step boundaries only


class Clock:
    def __init__(self, shape: Shape, sync: Any) -> None:
        self.calls, self.shape, self.sync = 0, shape, sync
        self.start = self.end = float("nan")

    def tick(self) -> None:
        """At the start of each training step's forward pass."""
        self.calls += 1
        if self.calls == self.shape.warmup + 1:
            self.sync()
            self.start = time.perf_counter()
        elif self.calls == self.shape.warmup + self.shape.steps + 1:
            self.sync()
            self.end = time.perf_counter()


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_plain(shape: Shape, clock: Clock, compiled: bool, workdir: Path) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    del workdir
    device = _device()
    torch.manual_seed(SEED)
    model = make_model(shape).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=3e-4,
        fused=True,
    )
    runner = torch.compile(model) if compiled else model
    loader = DataLoader(
        TensorDataset(tokens(shape)), batch_size=shape.batch, pin_memory=device.type == "cuda"
    )
    model.train()
    for (batch,) in loader:
        batch = batch.to(device, non_blocking=True)
        clock.tick()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = runner(batch[:, :-1])
        loss = lm_loss(logits, batch[:, 1:])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    return model


_STATE: dict[str, Any] = {}  # what the registered task and model read: the shape and the clock


def _register() -> None:
    """Registers ``gpu_lm`` (the model) and ``gpu_lm_tokens`` (the task) with ``ml``, once."""
    from dataclasses import dataclass as config_dataclass

    from ml.core.registry import register_model, register_task, registered_names

    if "gpu_lm" in registered_names("model"):
        return
    from torch.utils.data import TensorDataset

    from ml.models.base import BaseModel, BaseModelConfig
    from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig

    @config_dataclass
    class LMConfig(BaseModelConfig):
        pass

    @register_model("gpu_lm")
    class LM(BaseModel[LMConfig]):
        def __init__(self, config: LMConfig) -> None:
            super().__init__(config)
            self.gpt = make_model(_STATE["shape"])

        def forward(self, tokens: Any) -> Any:
            return self.gpt(tokens)

    @config_dataclass
    class TokensConfig(SupervisedLearningTaskConfig):
        pass

    @register_task("gpu_lm_tokens")
    class Tokens(SupervisedLearningTask[TokensConfig]):
        def get_dataset(self, phase: Any) -> Any:
            if phase != "train":
                raise NotImplementedError(f"no {phase} data")
            return TensorDataset(tokens(_STATE["shape"]))

        def run_model(self, model: Any, batch: Any, state: Any) -> Any:
            _STATE["clock"].tick()  # outside the compiled model
            return model(batch[0][:, :-1])

        def compute_loss(self, model: Any, batch: Any, state: Any, output: Any) -> Any:
            return lm_loss(output, batch[0][:, 1:])


def run_ml(shape: Shape, clock: Clock, compiled: bool, workdir: Path) -> Any:
    from ml.cli import main

    _STATE.update(shape=shape, clock=clock)
    _register()
    steps = shape.warmup + shape.steps + 1
    config = workdir / "config.yaml"
    config.write_text(
        "model: {name: gpu_lm}\n"
        f"task: {{name: gpu_lm_tokens, seed: {SEED}, max_steps: {steps},\n"
        f"       train_dl: {{batch_size: {shape.batch}, shuffle: false, drop_last: true}}}}\n"
        "optimizer: {name: adamw, lr: 3e-4, weight_decay: 0.1}\n"
        "trainer:\n"
        "  name: sl\n"
        "  precision: bf16\n"
        f"  compile_model: {str(compiled).lower()}\n"
        "  valid_at_end: false\n"
        "  test_at_end: false\n"
        "  progress_bar: false\n"
        "  checkpoint: {save_every_n_seconds: null}\n"
        "logger: [{name: stdout}, {name: jsonl}]\n"
    )
    code = main(["train", str(config), f"trainer.exp_dir={workdir / 'run'}"])
    if code != 0:
        raise RuntimeError(f"ml train exited with {code}")
    return None


def worker(contender: str, shape: Shape, smoke: bool) -> dict[str, Any]:
    """One contender's run in this interpreter: its timed seconds and throughput."""
    import torch

    torch.manual_seed(SEED)
    if smoke and not _STATE.get("eager_compile"):  # dynamo without code generation: the plumbing
        import functools

        _STATE["eager_compile"] = True
        torch.compile = functools.partial(torch.compile, backend="eager")  # type: ignore[assignment]
    clock = Clock(shape, _sync)
    compiled = contender.endswith("compiled")
    with tempfile.TemporaryDirectory() as tmp:
        run = run_ml if contender.startswith("ml") else run_plain
        run(shape, clock, compiled, Path(tmp))
    seconds = clock.end - clock.start
    count = shape.batch * shape.context * shape.steps
    return {"contender": contender, "seconds": seconds, "tokens_per_s": count / seconds, "steps": shape.steps}


def run_contenders(
    contenders: list[str], shape: Shape, smoke: bool, timeout_s: float
) -> list[dict[str, Any]]:
    """``worker`` for each contender, one after the other, in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", ",".join(contenders), "--result", str(out)]
        if smoke:
            cmd.append("--smoke")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
        }
        proc = subprocess.run(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout_s
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{', '.join(contenders)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return list(json.loads(out.read_text()))


_REPO = Path(__file__).resolve().parent.parent


def peak_tflops(override: float | None) -> tuple[float | None, str]:
    """The device's peak dense bf16 TFLOP/s, and where the figure comes from."""
    if override is not None:
        return override, "--peak-tflops"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    name = torch.cuda.get_device_name(0)
    value = peak_of(name)
    if value is None:
        return None, f"{name}: peak unknown (give --peak-tflops)"
    return value, f"{name}: {value:g} TFLOP/s dense bf16 (NVIDIA's figure)"


def peak_of(name: str) -> float | None:
    """The peak dense bf16 TFLOP/s of the device called ``name``, if :data:`PEAK_TFLOPS` knows it."""
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def summarize(
    results: list[dict[str, Any]], shape: Shape, params: int, peak: float | None
) -> tuple[list[str], list[list[Any]]]:
    """The table: each contender's ratio is to the plain loop run the same way (eager or compiled);
    a contender whose plain loop has not run (yet) has none."""
    per_token = flops_per_token(shape, params)
    plain = {r["contender"]: r["tokens_per_s"] for r in results if r["contender"].startswith("plain")}
    columns = ["contender", "tokens/s", "x plain", "ms/step", "MFU %"]
    rows = []
    for r in results:
        mfu = 100.0 * per_token * r["tokens_per_s"] / (peak * 1e12) if peak else None
        baseline = plain.get("plain compiled" if r["contender"].endswith("compiled") else "plain")
        rows.append(
            [
                r["contender"],
                r["tokens_per_s"],
                r["tokens_per_s"] / baseline if baseline else None,
                1000.0 * r["seconds"] / r["steps"],
                mfu,
            ]
        )
    return columns, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the tiny shape on the CPU (the default without CUDA)"
    )
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="comma-separated, from: " + ", ".join(CONTENDERS)
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per contender")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    smoke = args.smoke or not torch.cuda.is_available()
    shape = SMOKE if smoke else Shape()
    if args.worker:
        if smoke:
            torch.set_num_threads(1)
        args.result.write_text(json.dumps([worker(c, shape, smoke) for c in args.worker.split(",")]))
        return

    contenders = [c.strip() for c in args.contenders.split(",")]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if (
        unknown
        or "plain" not in contenders
        or ("ml compiled" in contenders) > ("plain compiled" in contenders)
    ):
        parser.error(
            "contenders must include plain (and plain compiled with ml compiled), "
            f"from {', '.join(CONTENDERS)}; got {args.contenders}"
        )
    params = weights(shape, make_model(shape))
    # A tiny shape on the CPU uses no GPU's peak, whatever the machine has.
    peak, source = (None, "none (smoke run)") if smoke else peak_tflops(args.peak_tflops)
    what = "smoke (CPU, tiny shape)" if smoke else "GPT-2 small shape"
    print(
        f"{what}: {asdict(shape)}; N = {params:,} weights; "
        f"{flops_per_token(shape, params) / 1e9:.3f} GFLOP/token; peak: {source}",
        file=sys.stderr,
    )

    def record(results: list[dict[str, Any]]) -> dict[str, Any]:
        columns, rows = summarize(results, shape, params, peak)
        return {
            "shape": asdict(shape),
            "smoke": smoke,
            "weights": params,
            "peak_tflops": peak,
            "peak_source": source,
            "columns": columns,
            "rows": rows,
            "runs": results,
        }

    results: list[dict[str, Any]] = []
    # One fresh interpreter for all in a smoke run (its start-up would be most of it); else one per
    # contender, the JSON written after each, so that a run cut short keeps what it measured.
    for group in [contenders] if smoke else [[c] for c in contenders]:
        results += run_contenders(group, shape, smoke, args.timeout)
        for r in results[-len(group) :]:
            print(f"{r['contender']}: {r['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
        if args.json is not None:
            done = {**record(results), "machine": machine()}
            args.json.write_text(json.dumps(done, indent=2, default=str) + "\n")
    final = record(results)
    print(table(final["columns"], final["rows"]))
    if not smoke:
        write_results("gpu_lm", final)


if __name__ == "__main__":
    main()
