"""Measures what each of ``ml``'s speed paths over private torch APIs (or glibc) gains over the public way.

Each path has a fallback to the public way (see its module); these are the numbers its comment
gives. One torch thread, denormals flushed, on the CPU; each part in a fresh interpreter, the two
ways alternating in rounds within it (medians over the rounds), so that the machine's load hits
both alike:

* ``adam`` (``ml.optimizers.fast``): a whole training step (forward, cross-entropy, backward,
  Adam at 1e-3; batch 64 of 64 features) of the 64-256-256-10 (``tiny``) and
  64-1024-1024-1024-10 (``big``) MLPs with torch's default Adam (on the CPU its per-tensor loop),
  its multi-tensor one (``foreach=True``), the fused kernel through torch's ``step``
  (``fused=True``), and that kernel called directly (``FusedAdamStep``); glibc's malloc untuned;
* ``grad_norm`` (``ml.utils.grad_norm``): ``total_norm`` against ``nn.utils.get_total_norm`` and
  ``clip_grad_norm_`` against ``nn.utils.clip_grad_norm_(foreach=True)`` on those MLPs' gradients
  (the best of 5 repeats of a ``timeit``);
* ``ppo`` (``ml.tasks.ppo``): the discrete-action loss's forward and backward pass alone (from
  the logits and values of a minibatch of 256, no entropy term, as CartPole's config has it), and a
  whole minibatch step on CartPole's actor-critic MLP (64x2 hidden: forward, loss, backward,
  clipping, fused Adam), with the fused loss and with plain autograd (``task.fused_loss=false``);
* ``malloc`` (``ml.utils.malloc``): the ``big`` MLP's whole step (torch's default Adam) with glibc's
  defaults and after ``tune_malloc()``, each in its own interpreter (two of each, alternating; their
  mean); steps/s and minor page faults.

    python bench/fast_paths.py [adam] [grad_norm] [ppo] [malloc]   # all four by default

About 30 s in all. Prints a table and writes ``bench/results/fast_paths.json``.
"""

import functools
import itertools
import json
import resource
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTS = ("adam", "grad_norm", "ppo", "malloc")
SIZES = {"tiny": (64, 256, 256, 10), "big": (64, 1024, 1024, 1024, 10)}
ROUNDS = 5


def _setup() -> Any:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    return torch


def _mlp(sizes: tuple[int, ...]) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _rounds(ways: dict[str, Callable[[int], None]], steps: int) -> dict[str, float]:
    """Steps/s of each way: the median over rounds, the ways alternating within each round."""
    for run in ways.values():
        run(max(2, steps // 10))  # warm up
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(ROUNDS):
        for name, run in ways.items():
            start = time.perf_counter()
            run(steps)
            rates[name].append(steps / (time.perf_counter() - start))
    return {name: sorted(r)[len(r) // 2] for name, r in rates.items()}


def _adam() -> list[list[Any]]:
    torch = _setup()
    import copy

    from torch import nn

    from ml.optimizers.fast import FusedAdamStep, use_fast_optimizer

    rows = []
    for model_name, sizes in SIZES.items():
        torch.manual_seed(0)
        x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
        first = _mlp(sizes)

        def way(kind: str, first: Any = first, x: Any = x, y: Any = y) -> Callable[[int], None]:
            model = copy.deepcopy(first)
            optim = torch.optim.Adam(model.parameters(), lr=1e-3)
            if kind in ("fused", "direct"):
                use_fast_optimizer(optim)  # fused Adam
            elif kind == "foreach":
                optim.param_groups[0]["foreach"] = True
            step = [optim.step]

            def run(n: int) -> None:
                for _ in range(n):
                    optim.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(x), y).backward()
                    step[0]()
                    if kind == "direct" and step[0] == optim.step:
                        step[0] = FusedAdamStep(optim)  # after the first step made the state

            return run

        kinds = ("default", "foreach", "fused", "direct")
        rates = _rounds({k: way(k) for k in kinds}, 100 if model_name == "tiny" else 8)
        for kind in kinds[1:]:
            rows.append([f"adam {model_name}: {kind} vs default", rates[kind], rates["default"]])
    return rows


def _grad_norm() -> list[list[Any]]:
    torch = _setup()
    from torch import nn

    from ml.utils.grad_norm import clip_grad_norm_, total_norm

    rows = []
    for model_name, sizes in SIZES.items():
        params = list(_mlp(sizes).parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        grads = [p.grad for p in params]
        number = 2000 if model_name == "tiny" else 100

        def per_s(fn: Callable[[], Any], number: int = number) -> float:
            return number / min(timeit.repeat(fn, number=number, repeat=5))

        rows.append(
            [
                f"grad_norm {model_name}: total_norm vs get_total_norm",
                per_s(functools.partial(total_norm, grads)),
                per_s(functools.partial(nn.utils.get_total_norm, grads)),
            ]
        )
        rows.append(
            [
                f"grad_norm {model_name}: clip_grad_norm_ vs torch's",
                per_s(functools.partial(clip_grad_norm_, params, 1e9)),
                per_s(functools.partial(nn.utils.clip_grad_norm_, params, 1e9, foreach=True)),
            ]
        )
    return rows


def _ppo() -> list[list[Any]]:
    torch = _setup()
    from ml.core.state import State
    from ml.examples.classic_control import ActorCriticMLP, ActorCriticMLPConfig, ClassicControlTask
    from ml.tasks.ppo import PPOTaskConfig, _categorical_losses, _CategoricalPPOLoss
    from ml.utils.grad_norm import clip_grad_norm_

    gen = torch.Generator().manual_seed(0)
    size = 256
    batch = {
        "observations": torch.randn(size, 4, generator=gen),
        "actions": torch.randint(0, 2, (size,), generator=gen),
        "log_probs": torch.log(torch.rand(size, generator=gen) * 0.5 + 0.25),
        "advantages": torch.randn(size, generator=gen),
        "returns": torch.randn(size, generator=gen),
    }
    logits = torch.randn(size, 2, generator=gen, requires_grad=True)
    values = torch.randn(size, generator=gen, requires_grad=True)
    rest = (
        batch["actions"],
        batch["log_probs"],
        batch["advantages"],
        batch["returns"],
        0.2,
        True,
        0.5,
        False,
    )

    def loss_only(fn: Callable[..., Any]) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                out = fn(logits, values, *rest)
                (out[0] + out[1]).backward()

        return run

    def whole_step(fused: bool) -> Callable[[int], None]:
        task = ClassicControlTask(PPOTaskConfig(name="classic_control", fused_loss=fused))
        torch.manual_seed(0)
        model = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=2))
        optim = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        params, state = list(model.parameters()), State.init_state()

        def run(n: int) -> None:
            for _ in range(n):
                losses = task.compute_loss(model, batch, state, model(batch["observations"]))
                optim.zero_grad(set_to_none=True)
                (losses["policy_loss"] + losses["value_term"]).backward()
                clip_grad_norm_(params, 0.5)
                optim.step()
            task._stats = ([], [], [])

        return run

    loss = _rounds(
        {"fused": loss_only(_CategoricalPPOLoss.apply), "autograd": loss_only(_categorical_losses)}, 200
    )
    step = _rounds({"fused": whole_step(True), "autograd": whole_step(False)}, 200)
    return [
        ["ppo loss forward+backward: fused vs autograd", loss["fused"], loss["autograd"]],
        ["ppo whole minibatch step: fused vs autograd", step["fused"], step["autograd"]],
    ]


def _malloc_worker(tuned: bool) -> dict[str, float]:
    torch = _setup()
    from torch import nn

    if tuned:
        from ml.utils.malloc import tune_malloc

        assert tune_malloc()
    torch.manual_seed(0)
    model = _mlp(SIZES["big"])
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))

    def run(n: int) -> None:
        for _ in range(n):
            optim.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optim.step()

    run(5)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rate = _rounds({"x": run}, 10)["x"]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"steps_per_s": rate, "faults_per_step": faults / (ROUNDS * 10 + 1)}


def _malloc() -> list[list[Any]]:
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(2):  # alternating interpreters
        for tuned in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, "--malloc-worker", str(int(tuned))],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[tuned].append(json.loads(out.strip().splitlines()[-1]))

    def mean(tuned: bool, key: str) -> float:
        values = [r[key] for r in runs[tuned]]
        return sum(values) / len(values)

    return [
        ["malloc big: steps/s tuned vs defaults", mean(True, "steps_per_s"), mean(False, "steps_per_s")],
        [
            "malloc big: page faults/step tuned vs defaults",
            mean(True, "faults_per_step"),
            mean(False, "faults_per_step"),
        ],
    ]


def main() -> None:
    if sys.argv[1:2] == ["--malloc-worker"]:
        print(json.dumps(_malloc_worker(bool(int(sys.argv[2])))))
        return
    if sys.argv[1:2] == ["--part"]:
        print(
            json.dumps(
                {"adam": _adam, "grad_norm": _grad_norm, "ppo": _ppo, "malloc": _malloc}[sys.argv[2]]()
            )
        )
        return
    parts = sys.argv[1:] or list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import table, write_results

    rows: list[list[Any]] = []
    for part in parts:
        out = subprocess.run(
            [sys.executable, __file__, "--part", part], capture_output=True, text=True, check=True
        ).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    for row in rows:
        row.append(row[1] / row[2])
    columns = ["what (fast vs public)", "fast /s", "public /s", "ratio"]
    print(table(columns, rows))
    write_results("fast_paths", {"columns": columns, "rows": rows})


if __name__ == "__main__":
    main()
