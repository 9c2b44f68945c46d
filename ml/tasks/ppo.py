"""Defines :class:`PPOTask`: proximal policy optimisation for discrete and continuous actions.

Clipped surrogate objective, value loss, entropy bonus, advantage normalisation per minibatch,
generalised advantage estimation (:func:`compute_gae`) that bootstraps truncated episodes from the
value of their final observation, an optional linear decay of the clip range, and an optional KL
early stop. Discrete action spaces use a categorical policy over the model's logits; ``Box`` spaces
a Gaussian with the model's state-independent ``log_std`` parameter. A model that masks actions
(gymnasium's ``info["action_mask"]``) gives the impossible ones a -inf logit: they are never
sampled, and add nothing to the entropy or its gradient.

The model maps observations to ``(policy_output, value)``: logits ``(B, n)`` for ``Discrete(n)``,
or means ``(B, *action_shape)`` plus a ``log_std`` parameter of the action's shape for ``Box``.

The loss is Stable-Baselines3's (and CleanRL's) with their defaults: per-minibatch advantage
normalisation (unbiased std, + 1e-8), ``-min(A r, A clip(r))``, an unclipped mean-squared value loss
weighted by ``vf_coef``, the clip range decayed on environment steps taken including the current
rollout's, over the run's (:func:`run_samples`, the lr schedule's length). For categorical policies
it is one autograd node with a hand-written backward (:class:`_CategoricalPPOLoss`), which is
cheaper than autograd's walk over the same expressions and gives the same gradients. Measured with
``python bench/fast_paths.py ppo`` (one CPU thread, a minibatch of 256, no entropy term, as
CartPole's config has it): the loss's forward and backward pass alone ~1.3x as fast as through
autograd (~0.20 ms instead of ~0.26); the whole minibatch step of CartPole's 64x2 actor-critic MLP
(forward, loss, backward, clipping, Adam, ~1.2 ms) within the machine's noise (0.87-1.0x over three
runs on a shared 2-core machine: the ~0.05 ms saved is at most ~5% of it). ``task.fused_loss=false``
computes the same expressions with plain autograd (:func:`_categorical_losses`), and so does a
process where the fused node does not give autograd's numbers on a small check made on first use (it
uses only public autograd APIs, but a torch could change them): a warning says so, once. Statistics
(approximate KL, clip fraction, entropy, value loss) are kept per minibatch and reduced only when a
logger writes them.
"""

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ml.core.config import conf_field
from ml.core.state import State
from ml.errors import ConfigError, NonFiniteLossError
from ml.tasks.rl import ReinforcementLearningTask, ReinforcementLearningTaskConfig
from ml.utils.checkpoint import unwrap_model

logger = logging.getLogger(__name__)

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class PPOTaskConfig(ReinforcementLearningTaskConfig):
    gamma: float = conf_field(0.99, help="Discount factor")
    gae_lambda: float = conf_field(0.95, help="GAE lambda (1: Monte Carlo returns, 0: one-step TD)")
    clip_coef: float = conf_field(0.2, help="Clip range of the probability ratio")
    clip_schedule: str = conf_field(
        "constant", help="`constant`, or `linear` decay to 0 over schedule_env_steps"
    )
    schedule_env_steps: int | None = conf_field(
        None,
        help="Environment steps over which `linear` decays (default: the run's, from task.max_samples "
        "and task.max_steps, as the lr schedule's length)",
    )
    vf_coef: float = conf_field(0.5, help="Weight of the value loss")
    ent_coef: float = conf_field(0.0, help="Weight of the entropy bonus")
    normalize_advantages: bool = conf_field(True, help="Normalise advantages within each minibatch")
    target_kl: float | None = conf_field(
        None, help="Stop the iteration's update when approx KL passes 1.5x this"
    )
    fused_loss: bool = conf_field(
        True,
        help="Discrete actions: the loss as one node with a hand-written backward (faster), else autograd",
    )


PPOTaskConfigT = TypeVar("PPOTaskConfigT", bound=PPOTaskConfig)


def _check_config(config: PPOTaskConfig) -> None:
    """Refuses settings that cannot mean anything (one line naming the key, the value and what is allowed)."""

    def refuse(key: str, allowed: str) -> None:
        raise ConfigError(f"task.{key} must be {allowed}, got {getattr(config, key)}")

    for key in ("gamma", "gae_lambda"):
        if not 0 <= getattr(config, key) <= 1:
            refuse(key, "in [0, 1]")
    if config.clip_coef <= 0:
        refuse("clip_coef", "positive")
    if config.vf_coef < 0:
        refuse("vf_coef", "at least 0")
    if config.target_kl is not None and config.target_kl <= 0:
        refuse("target_kl", "positive (or null, for no KL early stop)")
    if config.schedule_env_steps is not None and config.schedule_env_steps <= 0:
        refuse("schedule_env_steps", "positive (or null: the run's length)")
    if config.clip_schedule not in ("constant", "linear"):
        raise ConfigError(f"task.clip_schedule must be 'constant' or 'linear', got {config.clip_schedule!r}")
    if config.clip_schedule == "linear" and config.schedule_env_steps is None and run_samples(config) is None:
        raise ConfigError(
            "task.clip_schedule=linear needs task.schedule_env_steps, task.max_samples or task.max_steps"
        )
    if config.normalize_advantages and config.minibatch_size < 2:
        raise ConfigError(
            f"task.minibatch_size must be at least 2 to normalise advantages within it, got "
            f"{config.minibatch_size} (or set task.normalize_advantages=false)"
        )
    rollout = config.num_envs * config.num_env_steps
    if rollout % config.minibatch_size:
        last = rollout % config.minibatch_size
        logger.warning(
            "task.minibatch_size=%d does not divide the rollout's %d transitions: each epoch's last "
            "minibatch holds %d%s",
            config.minibatch_size,
            rollout,
            last,
            " (a single sample: its advantage is not normalised)" if last == 1 else "",
        )


def run_samples(config: ReinforcementLearningTaskConfig) -> int | None:
    """The environment steps the run takes: ``task.max_samples``, or ``task.max_steps`` iterations
    of every environment of every process, whichever ends it first (None when neither is set).

    The same measure as the lr schedule's default length (:func:`ml.core.config.task_steps`, in
    iterations), so that a linear clip range reaches 0 at the iteration the learning rate does.
    """
    world_size = max(1, int(os.environ.get("WORLD_SIZE", "1")))  # as task_steps counts processes
    limits = [config.max_samples]
    if config.max_steps is not None:
        limits.append(config.max_steps * config.num_envs * config.num_env_steps * world_size)
    known = [int(limit) for limit in limits if limit is not None]
    return min(known) if known else None


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """Generalised advantage estimates for ``(T, num_envs)`` tensors.

    ``next_values[t]`` is the value of the state that followed step ``t``: the next step's
    observation, or for an episode that ended at ``t`` the observation it ended in (the environment
    has already been reset). A terminated step does not bootstrap; a truncated one does. No estimate
    flows across the end of an episode.

    Returns:
        The advantages, ``(T, num_envs)``.
    """
    not_terminated = (~terminated).to(values.dtype)
    continues = (~(terminated | truncated)).to(values.dtype)
    deltas = rewards + gamma * next_values * not_terminated - values
    carries = (gamma * gae_lambda) * continues
    if deltas.device.type == "cpu" and not deltas.requires_grad:
        # The backward recursion is a few small operations per step: NumPy's are several times cheaper.
        d, c = deltas.numpy(), carries.numpy()
        out = np.empty_like(d)
        last = np.zeros_like(d[0])
        for t in range(d.shape[0] - 1, -1, -1):
            last = d[t] + c[t] * last
            out[t] = last
        return torch.from_numpy(out)
    advantages = torch.empty_like(values)
    last_t = torch.zeros_like(values[0])
    for t in range(values.shape[0] - 1, -1, -1):
        last_t = deltas[t] + carries[t] * last_t
        advantages[t] = last_t
    return advantages


class _CategoricalPPOLoss(torch.autograd.Function):
    """PPO's clipped policy loss, weighted value loss and mean entropy for a categorical policy, as one node.

    The forward pass is the usual arithmetic (run without recording a graph); the backward pass
    writes the gradients with respect to the logits and values out in a few operations instead of
    walking some twenty small nodes, which for a small model cost more than its layers. The
    gradients are autograd's for the same expressions: ``torch.minimum`` and ``clamp`` pass the
    policy gradient exactly where the unclipped term is the smaller or equal one (``-A r / B`` with
    respect to ``log pi(a)``), ``d log pi(a) / dz = onehot(a) - softmax(z)``, the mean entropy's is
    ``-p (log p + H) / B`` and the weighted value loss's ``2 c (v - R) / B``.

    Returns:
        ``policy_loss``; ``value_term`` (``vf_coef`` times the mean squared error); the mean entropy
        (NaN unless ``with_entropy``, which an entropy bonus needs; its gradient is right either
        way); and, not differentiable, for statistics: the unweighted value loss, the per-sample log
        ratios and the log-probabilities of every action.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        values: torch.Tensor,
        actions: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        clip: float,
        normalize: bool,
        vf_coef: float,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, ...]:
        log_p = F.log_softmax(logits, dim=-1)
        index = actions.long().unsqueeze(-1)
        log_ratio = log_p.gather(-1, index).squeeze(-1) - old_log_probs
        ratio = log_ratio.exp()
        if normalize and advantages.numel() > 1:
            std, mean = torch.std_mean(advantages)
            advantages = (advantages - mean) / (std + 1e-8)
        surrogate = advantages * ratio
        clipped = advantages * ratio.clamp(1 - clip, 1 + clip)
        policy_loss = -torch.minimum(surrogate, clipped).mean()
        error = values - returns
        value_loss = error.square().mean()
        if with_entropy:
            entropy_mean = _categorical_entropy(log_p).mean()
        else:
            entropy_mean = torch.full((), float("nan"), dtype=logits.dtype, device=logits.device)
        # d policy_loss / d log pi(a), for a gradient of 1 on the policy loss.
        policy_grad = surrogate.mul_(surrogate <= clipped).div_(-logits.shape[0])
        ctx.save_for_backward(log_p, index, policy_grad, error)
        ctx.vf_coef = vf_coef
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(value_loss, log_ratio, log_p)
        return policy_loss, vf_coef * value_loss, entropy_mean, value_loss, log_ratio, log_p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        g_policy, g_value, g_entropy = grads[:3]
        log_p, index, policy_grad, error = ctx.saved_tensors
        n = log_p.shape[0]
        grad_logits = grad_values = None
        if ctx.needs_input_grad[0]:
            p = log_p.exp()
            g = policy_grad * g_policy if g_policy is not None else torch.zeros_like(policy_grad)
            grad_logits = p * g.neg().unsqueeze(-1)
            grad_logits.scatter_add_(-1, index, g.unsqueeze(-1))
            if g_entropy is not None:
                # An impossible action's log p (-inf) as the least float: its p (0) zeroes its terms.
                finite_log_p = _finite_log_p(log_p)
                entropy = -(p * finite_log_p).sum(-1, keepdim=True)
                grad_logits -= p * (finite_log_p + entropy) * (g_entropy / n)
        if ctx.needs_input_grad[1] and g_value is not None:
            grad_values = error * (g_value * (2 * ctx.vf_coef / n))
        return (grad_logits, grad_values, *(None,) * 8)


def _categorical_losses(
    logits: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    clip: float,
    normalize: bool,
    vf_coef: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, ...]:
    """What :class:`_CategoricalPPOLoss` computes (its arguments, its outputs), with plain autograd."""
    log_p = F.log_softmax(logits, dim=-1)
    log_ratio = log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1) - old_log_probs
    ratio = log_ratio.exp()
    if normalize and advantages.numel() > 1:
        std, mean = torch.std_mean(advantages)
        advantages = (advantages - mean) / (std + 1e-8)
    policy_loss = -torch.minimum(advantages * ratio, advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    value_loss = (values - returns).square().mean()
    if with_entropy:
        entropy_mean = _categorical_entropy(log_p).mean()
    else:
        entropy_mean = torch.full((), float("nan"), dtype=logits.dtype, device=logits.device)
    detached = value_loss.detach(), log_ratio.detach(), log_p.detach()
    return policy_loss, vf_coef * value_loss, entropy_mean, *detached


_fused_ok: bool | None = None  # whether the fused node gives autograd's numbers here; checked on first use


def _fused_loss_works() -> bool:
    """Whether :class:`_CategoricalPPOLoss` gives :func:`_categorical_losses`'s losses and gradients
    on a small float64 batch (once per process; a warning if not)."""
    global _fused_ok
    if _fused_ok is None:
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
                _fused_ok = _check_fused_loss()
            reason = "it gives other numbers than autograd"
        except Exception as e:  # whatever the failure: autograd instead
            _fused_ok, reason = False, f"it fails: {e!r}"
        if not _fused_ok:
            logger.warning(
                "PPO's loss through plain autograd (slower): the fused loss cannot be used, %s", reason
            )
    return _fused_ok


def _check_fused_loss() -> bool:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 3, dtype=torch.float64, generator=gen)
    values, returns, advantages = torch.randn(3, 16, dtype=torch.float64, generator=gen)
    actions = torch.randint(0, 3, (16,), generator=gen)
    old_log_probs = F.log_softmax(logits + torch.randn(16, 3, dtype=torch.float64, generator=gen), -1)
    old_log_probs = old_log_probs.gather(-1, actions[:, None]).squeeze(-1)
    outputs, grads = [], []
    for fn in (_CategoricalPPOLoss.apply, _categorical_losses):
        inputs = logits.clone().requires_grad_(), values.clone().requires_grad_()
        out = fn(*inputs, actions, old_log_probs, advantages, returns, 0.2, True, 0.5, True)
        grads.append(torch.autograd.grad(out[0] + out[1] - 0.1 * out[2], inputs))
        outputs.append(out)
    same = all(torch.allclose(a, b) for a, b in zip(*outputs, strict=True))
    return same and all(torch.allclose(a, b) for a, b in zip(*grads, strict=True))


def _finite_log_p(log_p: torch.Tensor) -> torch.Tensor:
    """``log_p`` with -inf (an impossible action's, from a masked -inf logit) as the least finite
    float, so that ``p * log p`` is 0 there, as its limit is, not ``0 * -inf`` = NaN. Every finite
    value, and a NaN, is left as it is."""
    return log_p.clamp(min=torch.finfo(log_p.dtype).min)


def _categorical_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """The entropy of each row of log-probabilities; impossible actions (-inf) add nothing."""
    return -(log_p.exp() * _finite_log_p(log_p)).sum(-1)


def _model_fix(model: nn.Module, key: str, setting: str, otherwise: str) -> tuple[str, str]:
    """How a refusal line starts and ends: ``model.<key>: `` and ``setting`` when the model's config
    has that key (the packaged ``actor_critic_mlp``'s), else no key and what the model must give
    (a user's model may have no such setting)."""
    config = getattr(unwrap_model(model), "config", None)
    if isinstance(config, DictConfig):
        has_key = key in config
    else:
        has_key = dataclasses.is_dataclass(config) and key in {f.name for f in dataclasses.fields(config)}
    return (f"model.{key}: ", setting) if has_key and setting else ("", otherwise)


def _mean_per_batch(batches: list[torch.Tensor], fn: Any) -> torch.Tensor:
    """The mean over minibatches of ``fn(batch).mean()``, in one pass when the minibatches are alike."""
    if len({b.shape for b in batches}) == 1:
        return fn(torch.stack(batches)).flatten(1).mean(1).mean()
    return torch.stack([fn(b).mean() for b in batches]).mean()


class PPOTask(ReinforcementLearningTask[PPOTaskConfigT]):
    """Proximal policy optimisation (clipped objective) over a ``(policy_output, value)`` model."""

    def __init__(self, config: PPOTaskConfigT) -> None:
        super().__init__(config)
        _check_config(config)
        # Plain copies of the hyperparameters read on every minibatch (config attribute access is slow).
        self._gamma, self._gae_lambda = float(config.gamma), float(config.gae_lambda)
        self._clip_coef, self._linear_clip = float(config.clip_coef), config.clip_schedule == "linear"
        horizon = config.schedule_env_steps
        self._horizon = run_samples(config) if horizon is None else horizon
        self._vf_coef, self._ent_coef = float(config.vf_coef), float(config.ent_coef)
        self._normalize_advantages = bool(config.normalize_advantages)
        self._target_kl = None if config.target_kl is None else float(config.target_kl)
        self._fused_loss = bool(config.fused_loss)
        self.discrete = True
        # Per minibatch, for the iteration's statistics: log ratios, entropies (for a categorical
        # policy, the log-probabilities they come from), value losses.
        self._stats: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
        self._kl_exceeded: torch.Tensor | None = None  # the last minibatch's, on the device

    def on_environments_ready(self, observation_space: Any, action_space: Any) -> None:
        from gymnasium import spaces

        super().on_environments_ready(observation_space, action_space)
        if isinstance(action_space, spaces.Discrete):
            if int(action_space.start) != 0:  # the policy's logits index actions from 0
                raise ConfigError(
                    f"task.env_id: {type(self).__name__} takes Discrete actions numbered from 0; "
                    f"{self.config.env_id}'s are {action_space} (renumber them with a gymnasium "
                    "ActionWrapper)"
                )
            self.discrete = True
        elif isinstance(action_space, spaces.Box):
            self.discrete = False
        else:
            raise ConfigError(f"{type(self).__name__} supports Discrete and Box actions, not {action_space}")

    # -- the policy

    def check_model(self, model: nn.Module) -> None:
        """Refuses a Gaussian policy (a ``log_std`` parameter) for discrete actions: the parameter
        would go unused, which also fails a DDP job at its second iteration."""
        inner = unwrap_model(model)
        if self.discrete and isinstance(getattr(inner, "log_std", None), torch.Tensor):
            no_log_std = "the model must not have a `log_std` parameter"
            fix = _model_fix(model, "continuous", "set model.continuous=false", no_log_std)
            raise ConfigError(
                f"{fix[0]}the environment's actions are discrete ({self.action_space}), but "
                f"{type(inner).__name__} has a `log_std` parameter for continuous ones: {fix[1]}"
            )

    def _log_std(self, model: nn.Module) -> torch.Tensor:
        log_std = getattr(unwrap_model(model), "log_std", None)  # also through a DDP wrapper
        if not isinstance(log_std, torch.Tensor):
            fix = _model_fix(
                model,
                "continuous",
                "set model.continuous=true",
                f"the model must have a `log_std` parameter of the action's shape {self.action_space.shape}",
            )
            raise ConfigError(
                f"{fix[0]}the environment's actions are continuous ({self.action_space}), which need a "
                f"model with a `log_std` parameter ({type(unwrap_model(model)).__name__} has none): {fix[1]}"
            )
        return log_std

    def _log_prob_entropy(
        self, model: nn.Module, policy_out: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.discrete:
            log_p = F.log_softmax(policy_out, dim=-1)
            log_prob = log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            return log_prob, _categorical_entropy(log_p)
        log_std = self._log_std(model)
        z = (actions - policy_out) * torch.exp(-log_std)
        log_prob = (-0.5 * z.pow(2) - log_std - _LOG_SQRT_2PI).flatten(1).sum(-1)
        entropy = (0.5 + _LOG_SQRT_2PI + log_std).sum().expand(policy_out.shape[0])
        return log_prob, entropy

    def get_actions(
        self, model: nn.Module, observations: torch.Tensor, optimal: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_out, value = model(observations)
        if not self.discrete:
            shape = self.action_space.shape if self.action_space is not None else policy_out.shape[1:]
            if policy_out.shape[1:] != shape:
                size = f"set model.action_size={shape[0]}" if len(shape) == 1 else ""
                fix = _model_fix(model, "action_size", size, f"the model must give means of shape {shape}")
                raise ConfigError(
                    f"{fix[0]}the model gives actions of shape {tuple(policy_out.shape[1:])}, but the "
                    f"environment's are {shape} ({self.action_space}): {fix[1]}"
                )
            if optimal:
                actions = policy_out
            else:
                actions = policy_out + torch.randn_like(policy_out) * self._log_std(model).exp()
            self._check_policy(actions.isfinite().all(), "actions")
            log_prob, _ = self._log_prob_entropy(model, policy_out, actions)
            return actions, {"log_probs": log_prob, "values": value.reshape(-1)}
        n = self.action_space.n if self.action_space is not None else policy_out.shape[-1]
        if policy_out.shape[-1] != n:
            fix = _model_fix(
                model, "action_size", f"set model.action_size={n}", f"the model must give {n} logits"
            )
            raise ConfigError(
                f"{fix[0]}the model gives {policy_out.shape[-1]} action logits, but the environment "
                f"has {n} actions: {fix[1]}"
            )
        log_p = F.log_softmax(policy_out, dim=-1)
        # A NaN or +inf logit makes its row's probabilities NaN (an impossible action's -inf is fine),
        # which both the sampling below and argmax would turn into action 0.
        self._check_policy(log_p.isnan().any().logical_not(), "action probabilities")
        if optimal:
            index = policy_out.argmax(-1, keepdim=True)
        else:
            # Inverse-CDF sampling from the categorical: one uniform draw per environment (cheaper
            # than torch.multinomial for a handful of rows); the last bin takes any rounding excess.
            cdf = log_p.exp().cumsum(-1)
            uniform = torch.rand((*cdf.shape[:-1], 1), dtype=cdf.dtype, device=cdf.device)
            index = (cdf <= uniform).sum(-1, keepdim=True).clamp_(max=n - 1)
        log_prob = log_p.gather(-1, index).squeeze(-1)
        return index.squeeze(-1), {"log_probs": log_prob, "values": value.reshape(-1)}

    def _check_policy(self, finite: torch.Tensor, what: str) -> None:
        """Stops when the policy is not a policy (one host read per call: the environments read the
        actions on the host right after it anyway)."""
        if not finite:
            raise NonFiniteLossError(
                f"{type(self).__name__}.get_actions: the policy's {what} are not finite (NaN/inf): the "
                "model's outputs are not finite for these observations (its weights, or the observations)"
            )

    # -- experience to samples

    @torch.no_grad()
    def build_rl_dataset(
        self, model: nn.Module, trajectory: dict[str, torch.Tensor], state: State
    ) -> dict[str, torch.Tensor]:
        values = trajectory["values"]
        terminated, truncated = trajectory["terminated"], trajectory["truncated"]
        next_values = torch.empty_like(values)
        next_values[:-1] = values[1:]
        next_values[-1] = model(trajectory["next_observations"])[1].reshape(-1)
        bootstrap = truncated & ~terminated  # ended by a time limit: the final state still has value
        if bootstrap.any():
            next_values[bootstrap] = model(trajectory["final_observations"][bootstrap])[1].reshape(-1)
        advantages = compute_gae(
            trajectory["rewards"],
            values,
            next_values,
            terminated,
            truncated,
            self._gamma,
            self._gae_lambda,
        )
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        return {
            "observations": flat(trajectory["observations"]),
            "actions": flat(trajectory["actions"]),
            "log_probs": flat(trajectory["log_probs"]),
            "values": flat(values),
            "advantages": flat(advantages),
            "returns": flat(advantages + values),
        }

    # -- the loss

    def clip_range(self, state: State) -> float:
        """The clip range now: constant, or decayed linearly with the environment steps taken."""
        if not self._linear_clip:
            return self._clip_coef
        assert self._horizon is not None
        return self._clip_coef * max(0.0, 1.0 - state.num_samples / self._horizon)

    def compute_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], state: State, output: Any
    ) -> dict[str, torch.Tensor]:
        policy_out, values = output
        clip = self.clip_range(state)
        if values.dim() != 1:
            values = values.reshape(-1)
        if self.discrete:
            fused = self._fused_loss and _fused_loss_works()
            losses_fn = _CategoricalPPOLoss.apply if fused else _categorical_losses
            policy_loss, value_term, entropy_mean, value_loss, log_ratio, log_p = losses_fn(
                policy_out,
                values,
                batch["actions"],
                batch["log_probs"],
                batch["advantages"],
                batch["returns"],
                clip,
                self._normalize_advantages,
                self._vf_coef,
                bool(self._ent_coef),
            )
            entropy_source = log_p  # the statistics' entropy comes from it, when logged
        else:
            log_prob, entropy = self._log_prob_entropy(model, policy_out, batch["actions"])
            log_ratio = log_prob - batch["log_probs"]
            ratio = log_ratio.exp()
            advantages = batch["advantages"]
            if self._normalize_advantages and advantages.numel() > 1:
                std, mean = torch.std_mean(advantages)
                advantages = (advantages - mean) / (std + 1e-8)
            policy_loss = -torch.min(advantages * ratio, advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
            value_loss = F.mse_loss(values, batch["returns"])
            value_term = self._vf_coef * value_loss
            entropy_mean = entropy.mean()
            log_ratio, entropy_source = log_ratio.detach(), entropy.detach()
        log_ratios, entropies, value_losses = self._stats
        log_ratios.append(log_ratio)
        entropies.append(entropy_source)
        value_losses.append(value_loss.detach())
        if self._target_kl is not None:
            with torch.no_grad():  # read by the trainer, with its check of the loss (update_stop_flag)
                approx_kl = (log_ratio.exp() - 1 - log_ratio).mean()
                self._kl_exceeded = approx_kl > 1.5 * self._target_kl
        # The terms of the objective, as weighted; rl/value_loss logs the unweighted value error.
        losses = {"policy_loss": policy_loss, "value_term": value_term}
        if self._ent_coef:
            losses["entropy_term"] = -self._ent_coef * entropy_mean
        return losses

    def update_stop_flag(self) -> torch.Tensor | None:
        """With ``task.target_kl``: whether the last minibatch's approximate KL passed 1.5x it."""
        return self._kl_exceeded

    def on_minibatches_skipped(self, minibatches: list[int]) -> None:
        """Drops the skipped minibatches' statistics (kept one per :meth:`compute_loss` call, in order)."""
        skipped = set(minibatches)
        log_ratios, entropies, value_losses = (
            [value for number, value in enumerate(values, 1) if number not in skipped]
            for values in self._stats
        )
        self._stats = (log_ratios, entropies, value_losses)

    def on_step_end(
        self, state: State, loss_dict: dict[str, torch.Tensor], model: nn.Module, optim: Any, lr_sched: Any
    ) -> None:
        """Logs the iteration's mean approximate KL, clip fraction, entropy and value loss.

        Each is the mean over the iteration's minibatches (with a KL stop, the one that stopped the
        update too) of its per-minibatch mean, computed only when a logger writes it.
        """
        log_ratios, entropies, value_losses = self._stats
        if log_ratios:
            clip = self.clip_range(state)
            self.logger.log_scalar(
                "approx_kl", lambda: _mean_per_batch(log_ratios, lambda x: x.exp() - 1 - x), namespace="rl"
            )
            self.logger.log_scalar(
                "clip_fraction",
                lambda: _mean_per_batch(log_ratios, lambda x: ((x.exp() - 1).abs() > clip).float()),
                namespace="rl",
            )
            per_sample = _categorical_entropy if self.discrete else (lambda x: x)
            self.logger.log_scalar("entropy", lambda: _mean_per_batch(entropies, per_sample), namespace="rl")
            self.logger.log_scalar("value_loss", lambda: torch.stack(value_losses).mean(), namespace="rl")
            self.logger.log_scalar("clip_range", clip, namespace="rl")
        self._stats = ([], [], [])
        self._kl_exceeded = None
