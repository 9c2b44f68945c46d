"""Faster optimizer steps: torch's fused Adam kernels, and a direct call of them on the CPU.

Both trainers use them unless ``trainer.fast_optimizer=false``. The update is the same arithmetic
in a different order, so its results differ from torch's other Adam steps in the last bits of
float32, not more. Measured with ``python bench/fast_paths.py adam`` (a whole training step, batch
64, one CPU thread, glibc's malloc untuned; medians of 5 alternating rounds in one process; two runs
on a shared 2-core machine, so the ranges are mostly its noise), against torch's default Adam on the
CPU (its per-tensor loop; its multi-tensor ``foreach=True`` one is 1.04-1.23x and 1.06-1.10x):

* the fused kernel through torch's ``step`` (:func:`use_fast_optimizer`): a 64-256-256-10 MLP's
  whole step 1.27-1.52x as fast, a 64-1024-1024-1024-10 one's 1.58-1.64x (one pass over each
  parameter's state instead of a dozen, with no temporaries to allocate; measured apart, after
  ``tune_malloc()``, which makes those temporaries cheap, the big one's gain over ``foreach=True``
  was ~1.2x instead of ~1.5x);
* the kernel called directly (:class:`FusedAdamStep`): 1.40-1.47x and 1.55-1.62x: torch's per-call
  bookkeeping off too, worth ~5% of the tiny MLP's step (within the noise of one run), none of the
  big one's.

This module is the one owner of the private torch names those paths use: ``torch._fused_adam_``,
``torch._fused_adamw_``, ``torch._foreach_add_`` and ``torch._foreach_sub_`` (the kernels), the
``found_inf`` attribute a fused optimizer's ``step`` reads (torch's gradient scaler sets it: how a
step is skipped on the device, :func:`step_skipping`), the ``_step_supports_amp_scaling`` flag that
tells the scaler so (without it the scaler reads ``found_inf`` on the host: one sync per fp16 step,
what torch does for any optimizer not built fused), the optimizer's
``_optimizer_step_pre_hooks``/``_optimizer_step_post_hooks`` and ``torch.optim.optimizer``'s
``_global_optimizer_pre_hooks``/``_global_optimizer_post_hooks`` (whether a step hook would be
skipped), and ``torch.utils._foreach_utils._get_fused_kernels_supported_devices``. Where one is
missing or behaves otherwise (the direct call is checked once per process against Adam's arithmetic
on two small tensors), the optimizer steps through torch's public ``optim.step()`` instead, after a
warning logged once: without the fused kernel if that is what is missing (the multi-tensor step, or
torch's per-tensor loop if ``torch._foreach_add_`` is gone too), else with it through torch.
"""

import logging
import math
from typing import Any

import torch
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

_KERNELS = ("_fused_adam_", "_fused_adamw_", "_foreach_add_", "_foreach_sub_")  # torch's fused Adam step
_direct_ok: bool | None = None  # whether the direct call works as Adam should; checked on first use
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _missing_kernels() -> list[str]:
    """The kernels this torch lacks, after a warning (the first time) if it lacks any."""
    missing = [f"torch.{name}" for name in _KERNELS if not hasattr(torch, name)]
    if missing:
        _warn_once(f"Adam steps through torch without the fused kernel (slower): no {', '.join(missing)}")
    return missing


def _fused_devices() -> tuple[str, ...]:
    """The device types with fused optimizer kernels (cpu and cuda at least)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError, TypeError):  # a torch without the helper, or another one
        return ("cpu", "cuda")


def use_fast_optimizer(optim: Optimizer) -> None:
    """Switches torch's optimizers from their per-tensor loop (the CPU default) to the fused kernel.

    A small MLP's update is dominated by per-operation overhead, so one fused step per parameter
    group instead of a dozen small operations per tensor saves a large share of each gradient step.
    Adam and AdamW get the fused kernel where every parameter of the group is a plain float32 or
    float64 parameter on a device that has it; other optimizers (and other groups) get ``foreach``.
    In a torch without the kernels (see the module docstring) Adam gets ``foreach`` too, and without
    ``torch._foreach_add_`` the groups are left as they are. Call it before the first step: it
    changes how the optimizer steps, not its state.
    """
    devices = _fused_devices()
    # torch's own Adam and AdamW only: a subclass's step may not be torch's (nor take the flags).
    adam = type(optim) in (torch.optim.Adam, torch.optim.AdamW)
    for group in optim.param_groups:
        floats = all(p.dtype in (torch.float32, torch.float64) for p in group["params"])
        fusable = floats and all(
            type(p) is torch.nn.Parameter and p.device.type in devices for p in group["params"]
        )  # not DTensors (FSDP), not a device without the kernels
        if "fused" in group and fusable and adam and not _missing_kernels():
            group["fused"], group["foreach"] = True, False
        elif "foreach" in group and hasattr(torch, "_foreach_add_"):
            group["foreach"] = True
    if adam and all(group.get("fused") for group in optim.param_groups):
        optim.defaults.update(fused=True, foreach=False)  # a group added later is fused too
    match_amp_scaling(optim)


def match_amp_scaling(optim: Optimizer) -> None:
    """Tells a gradient scaler (fp16) whether torch's Adam or AdamW takes its found_inf flag: when
    every group is fused, as torch's constructor does for ``fused=True``. Then the scaler hands the
    flag to the kernel, where otherwise it reads it on the host before every step. Asked again at
    every fp16 step (:meth:`ml.utils.precision.MixedPrecision.step`): a checkpoint's optimizer
    state, or a group added since, may have changed which groups are fused, and a group that is
    not asserts the flag is not there."""
    if type(optim) in (torch.optim.Adam, torch.optim.AdamW):  # (a subclass's step may ignore it)
        fused = all(group.get("fused") for group in optim.param_groups)
        optim._step_supports_amp_scaling = fused  # type: ignore[attr-defined]


def _step_hooks(optim: Optimizer) -> tuple[Any, ...] | None:
    """The optimizer's and the global step hooks (dicts), or None where this torch keeps them elsewhere."""
    from torch.optim import optimizer as torch_optimizer

    try:
        hooks = (
            optim._optimizer_step_pre_hooks,
            optim._optimizer_step_post_hooks,
            torch_optimizer._global_optimizer_pre_hooks,
            torch_optimizer._global_optimizer_post_hooks,
        )
    except AttributeError:
        return None
    return hooks if all(isinstance(h, dict) for h in hooks) else None


def _fused_update(
    decoupled: bool,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    group: dict[str, Any],
    found_inf: torch.Tensor | None = None,
) -> None:
    """One Adam (``decoupled``: AdamW) update of a group's tensors, as torch's fused step makes it.

    With ``found_inf`` (a float tensor, 1.0: skip) the kernel leaves everything as it was, and the
    step counts are taken back, on the device, as torch's fused step does for a gradient scaler.
    Raises what the kernels raise, with the step counts as they were.
    """
    beta1, beta2 = group["betas"]
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    torch._foreach_add_(steps, 1)
    try:
        kernel(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=found_inf,
        )
    except Exception:
        for step in steps:
            step.sub_(1)
        raise
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def _direct_call_works() -> bool:
    """Whether :func:`_fused_update` does Adam's and AdamW's arithmetic here (checked once per process)."""
    global _direct_ok
    if _direct_ok is None:
        _direct_ok = _check_direct_call()
    return _direct_ok


def _check_direct_call() -> bool:
    if _missing_kernels():
        return False
    group: dict[str, Any] = {"lr": 0.1, "betas": (0.9, 0.99), "weight_decay": 0.1, "eps": 1e-3}
    start, grads = [1.0, -2.0], [[0.5, 1.0], [-0.25, 2.0]]
    try:
        for decoupled in (False, True):
            param, step = torch.tensor(start, dtype=torch.float32), torch.tensor(0.0, dtype=torch.float32)
            exp_avg, exp_avg_sq = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float32)
            for grad in grads:
                _fused_update(
                    decoupled,
                    [param],
                    [torch.tensor(grad, dtype=torch.float32)],
                    [exp_avg],
                    [exp_avg_sq],
                    [step],
                    group,
                )
            want = [
                _adam_reference(x, [g[i] for g in grads], decoupled, **group) for i, x in enumerate(start)
            ]
            if step.item() != 2.0 or not all(
                math.isclose(got, w, rel_tol=1e-5) for got, w in zip(param.tolist(), want, strict=True)
            ):
                raise ValueError(f"{param.tolist()} after two steps where Adam gives {want}")
    except Exception as e:  # whatever the failure: torch's step instead
        _warn_once(f"Adam steps through torch (slower): the fused kernel called directly fails: {e!r}")
        return False
    return True


def _adam_reference(
    x: float,
    grads: list[float],
    decoupled: bool,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
) -> float:
    """A parameter after Adam (``decoupled``: AdamW) steps with ``grads``, in float64 (torch's formulas)."""
    beta1, beta2 = betas
    m = v = 0.0
    for t, g in enumerate(grads, 1):
        if decoupled:
            x *= 1 - lr * weight_decay
        else:
            g += weight_decay * x
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        x -= lr / (1 - beta1**t) * m / (math.sqrt(v) / math.sqrt(1 - beta2**t) + eps)
    return x


class FusedAdamStep:
    """``optim.step()`` for a fused ``Adam``/``AdamW`` on the CPU: its kernel called directly, per group.

    torch's ``step`` regroups the tensors by device and walks every parameter's state in Python on
    each call, which for a small model costs several times the update itself. This makes the same
    calls as torch's fused path (``_foreach_add_`` on the step counts, then ``_fused_adam_`` or
    ``_fused_adamw_`` with the group's hyperparameters) on the optimizer's own state tensors, so the
    result and the optimizer's ``state_dict`` are the same. Anything but the plain case goes to
    ``optim.step()``: state not made yet (the first step), a parameter without a gradient, step hooks,
    ``amsgrad``, ``maximize``, ``capturable``, ``differentiable``, tensor hyperparameters, tensors
    that are not float32 on the CPU; and so does every step where the private names the direct call
    needs are missing or misbehave (see the module docstring; a group a checkpoint made ``fused`` then
    steps with ``foreach``, or torch's per-tensor loop, if the kernel is gone). Made anew for each
    update, so that it never holds state tensors a ``load_state_dict`` replaced.
    """

    def __init__(self, optim: Optimizer) -> None:
        self.optim = optim
        self._groups: list[tuple[dict[str, Any], list[Any], list[Any], list[Any], list[Any]]] | None = None
        self._plain = True
        self._unfused = False  # whether fused groups were checked for a kernel this torch lacks

    def _plain_groups(self) -> list[tuple[dict[str, Any], list[Any], list[Any], list[Any], list[Any]]] | None:
        """Each group with its parameters and state tensors; None (and ``_plain`` False) if not plain."""
        optim = self.optim
        self._plain = False
        if type(optim) not in (torch.optim.Adam, torch.optim.AdamW):
            return None
        hooks = _step_hooks(optim)
        if hooks is None:
            _warn_once(
                "Adam steps through torch (slower): this torch keeps its optimizer step hooks elsewhere"
            )
            return None
        if any(hooks) or not _direct_call_works():
            return None
        if getattr(optim, "grad_scale", None) is not None or getattr(optim, "found_inf", None) is not None:
            return None  # a gradient scaler's: torch's step handles it
        groups = []
        for group in optim.param_groups:
            flags = ("amsgrad", "maximize", "capturable", "differentiable")
            if not group.get("fused") or any(group.get(flag) for flag in flags):
                return None
            numbers = (group["lr"], *group["betas"], group["weight_decay"], group["eps"])
            if any(isinstance(x, torch.Tensor) for x in numbers):
                return None
            params = group["params"]
            if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
                return None
            found = [optim.state.get(p) for p in params]
            states = [st for st in found if st and isinstance(st.get("step"), torch.Tensor)]
            if len(states) < len(params):
                self._plain = True  # no step made yet: look again after the next one
                return None
            exp_avgs = [st["exp_avg"] for st in states]
            exp_avg_sqs = [st["exp_avg_sq"] for st in states]
            steps = [st["step"] for st in states]
            if any(
                t.device.type != "cpu" or t.dtype != torch.float32 for t in (*exp_avgs, *exp_avg_sqs, *steps)
            ):
                return None
            groups.append((group, params, exp_avgs, exp_avg_sqs, steps))
        self._plain = True
        return groups

    def _still_current(
        self, groups: list[tuple[dict[str, Any], list[Any], list[Any], list[Any], list[Any]]]
    ) -> bool:
        """Whether the groups found are still the optimizer's: the same groups, each with the same
        parameter list, length and parameters, each parameter with the same state tensors. A hook
        may add a group or swap one (unfreezing a part), replace or change a group's list, or
        reset, drop or load any state; the direct call would go on stepping what it found, and what
        is new would never train (a few lookups per parameter: ~2 us a step for a small MLP)."""
        current = self.optim.param_groups
        if len(groups) != len(current):
            return False
        state = self.optim.state
        for (group, params, exp_avgs, exp_avg_sqs, steps), now in zip(groups, current, strict=True):
            if now is not group or now["params"] is not params or len(params) != len(exp_avgs):
                return False
            for p, exp_avg, exp_avg_sq, step in zip(params, exp_avgs, exp_avg_sqs, steps, strict=True):
                st = state.get(p)  # (a parameter replaced in the list has other state, or none)
                if st is None or st.get("exp_avg") is not exp_avg or st.get("exp_avg_sq") is not exp_avg_sq:
                    return False
                if st.get("step") is not step:
                    return False
        return True

    def _torch_step(self, found_inf: torch.Tensor | None) -> None:
        """``optim.step()``; first, once, fused groups step unfused where this torch lacks the kernels."""
        if not self._unfused:
            self._unfused = True
            fused = [g for g in self.optim.param_groups if g.get("fused")]
            if fused and _missing_kernels():
                for group in fused:
                    group["fused"], group["foreach"] = False, hasattr(torch, "_foreach_add_")
        step_skipping(self.optim, found_inf)

    def __call__(self, found_inf: torch.Tensor | None = None) -> None:
        """Steps the optimizer; with ``found_inf`` 1.0 changes nothing (decided on the device)."""
        if self._groups is not None and not self._still_current(self._groups):
            self._groups, self._plain = None, True  # a hook changed the groups or the state: look again
        if self._groups is None and self._plain:
            self._groups = self._plain_groups()
        groups = self._groups
        grads = [[p.grad for p in params] for _, params, _, _, _ in groups] if groups is not None else []
        if groups is None or any(g is None for group_grads in grads for g in group_grads):
            self._torch_step(found_inf)
            return
        done = 0
        try:
            for (group, params, exp_avgs, exp_avg_sqs, steps), group_grads in zip(groups, grads, strict=True):
                decoupled = bool(group.get("decoupled_weight_decay"))
                _fused_update(decoupled, params, group_grads, exp_avgs, exp_avg_sqs, steps, group, found_inf)
                done += 1
        except (AttributeError, TypeError, RuntimeError, NotImplementedError) as e:
            self._give_up(e, [params for _, params, _, _, _ in groups[:done]], found_inf)

    def _give_up(
        self, error: Exception, updated: list[list[torch.Tensor]], found_inf: torch.Tensor | None
    ) -> None:
        """After a failed direct call: the rest of the update through torch, and torch's step from now on."""
        global _direct_ok
        _direct_ok = False
        self._groups, self._plain = None, False
        _warn_once(f"Adam steps through torch (slower): the fused kernel called directly failed: {error!r}")
        hidden = [(p, p.grad) for params in updated for p in params]  # their update is made: torch skips
        for p, _ in hidden:
            p.grad = None
        try:
            self._torch_step(found_inf)
        finally:
            for p, grad in hidden:
                p.grad = grad


def clear_grads(optim: Optimizer) -> None:
    """``optim.zero_grad(set_to_none=True)``, without torch's wrapper around it where that is all
    it would do: a torch optimizer whose ``zero_grad`` is torch's (not one its class or the instance
    defines, nor an object that only passes calls on to an optimizer).

    torch's ``zero_grad`` runs its loop inside a profiler range and behind a ``torch._dynamo``
    guard, which cost ~11 us a call on one CPU thread where the loop costs ~1 us: about a fortieth
    of the 64-256-256-10 MLP's step (bench/overhead.py, ``ml`` with the plain loop's arithmetic:
    0.955x to 0.98x the plain loop in-process). A profiler trace then shows no ``zero_grad`` range.
    """
    if (
        not isinstance(optim, Optimizer)
        or type(optim).zero_grad is not Optimizer.zero_grad
        or "zero_grad" in vars(optim)
    ):
        optim.zero_grad(set_to_none=True)
        return
    for group in optim.param_groups:
        for p in group["params"]:
            p.grad = None


# Optimizers whose fused step takes ``found_inf``: what torch's gradient scaler relies on.
_SKIPPING = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def skips_on_device(optim: Optimizer) -> bool:
    """Whether :func:`step_skipping` decides on the device: every group of a torch optimizer with a
    fused kernel is fused (else it reads the flag on the host once per step)."""
    # torch's own classes only: a subclass's step may ignore the flag and apply the step.
    return type(optim) in _SKIPPING and all(group.get("fused") for group in optim.param_groups)


def step_skipping(optim: Optimizer, found_inf: torch.Tensor | None) -> None:
    """``optim.step()``, unless ``found_inf`` (a float tensor) is 1.0: then nothing changes.

    A fused optimizer's kernel reads the flag itself (torch's ``found_inf`` attribute, set for the
    call as its gradient scaler does): no host sync. Any other optimizer reads it on the host first.
    """
    if found_inf is None:
        optim.step()
    elif skips_on_device(optim):
        optim.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            optim.step()
        finally:
            del optim.found_inf  # type: ignore[attr-defined]
    elif not found_inf.item():
        optim.step()
