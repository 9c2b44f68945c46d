"""Defines :class:`PPOTask`: proximal policy optimisation for discrete and continuous actions.

Clipped surrogate objective, value loss, entropy bonus, advantage normalisation per minibatch,
generalised advantage estimation (:func:`compute_gae`) that bootstraps truncated episodes from the
value of their final observation, an optional linear decay of the clip range, and an optional KL
early stop. Discrete action spaces use a categorical policy over the model's logits; ``Box`` spaces
a Gaussian with the model's state-independent ``log_std`` parameter.

The model maps observations to ``(policy_output, value)``: logits ``(B, n)`` for ``Discrete(n)``,
or means ``(B, *action_shape)`` plus a ``log_std`` parameter of the action's shape for ``Box``.
"""

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ml.core.compose import ConfigError
from ml.core.config import conf_field
from ml.core.state import State
from ml.tasks.rl import ReinforcementLearningTask, ReinforcementLearningTaskConfig
from ml.utils.checkpoint import unwrap_model

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
        None, help="Environment steps over which `linear` decays (default: task.max_samples)"
    )
    vf_coef: float = conf_field(0.5, help="Weight of the value loss")
    ent_coef: float = conf_field(0.0, help="Weight of the entropy bonus")
    normalize_advantages: bool = conf_field(True, help="Normalise advantages within each minibatch")
    target_kl: float | None = conf_field(
        None, help="Stop the iteration's update when approx KL passes 1.5x this"
    )


PPOTaskConfigT = TypeVar("PPOTaskConfigT", bound=PPOTaskConfig)


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
    advantages = torch.empty_like(values)
    last = torch.zeros_like(values[0])
    for t in range(values.shape[0] - 1, -1, -1):
        last = deltas[t] + gamma * gae_lambda * continues[t] * last
        advantages[t] = last
    return advantages


class PPOTask(ReinforcementLearningTask[PPOTaskConfigT]):
    """Proximal policy optimisation (clipped objective) over a ``(policy_output, value)`` model."""

    def __init__(self, config: PPOTaskConfigT) -> None:
        super().__init__(config)
        if config.clip_schedule not in ("constant", "linear"):
            raise ValueError(
                f"task.clip_schedule must be 'constant' or 'linear', got {config.clip_schedule!r}"
            )
        if config.clip_schedule == "linear" and (config.schedule_env_steps or config.max_samples) is None:
            raise ValueError("task.clip_schedule=linear needs task.schedule_env_steps or task.max_samples")
        # Plain copies of the hyperparameters read on every minibatch (config attribute access is slow).
        self._gamma, self._gae_lambda = float(config.gamma), float(config.gae_lambda)
        self._clip_coef, self._linear_clip = float(config.clip_coef), config.clip_schedule == "linear"
        self._horizon = config.schedule_env_steps or config.max_samples
        self._vf_coef, self._ent_coef = float(config.vf_coef), float(config.ent_coef)
        self._normalize_advantages = bool(config.normalize_advantages)
        self._target_kl = None if config.target_kl is None else float(config.target_kl)
        self.discrete = True
        self._stats: list[torch.Tensor] = []
        self._stop_update = False

    def on_environments_ready(self, observation_space: Any, action_space: Any) -> None:
        from gymnasium import spaces

        super().on_environments_ready(observation_space, action_space)
        if isinstance(action_space, spaces.Discrete):
            self.discrete = True
        elif isinstance(action_space, spaces.Box):
            self.discrete = False
        else:
            raise ConfigError(f"{type(self).__name__} supports Discrete and Box actions, not {action_space}")

    # -- the policy

    def _log_std(self, model: nn.Module) -> torch.Tensor:
        log_std = getattr(unwrap_model(model), "log_std", None)  # also through a DDP wrapper
        if not isinstance(log_std, torch.Tensor):
            raise ConfigError(
                f"continuous actions need a model with a `log_std` parameter ({type(model).__name__})"
            )
        return log_std

    def _log_prob_entropy(
        self, model: nn.Module, policy_out: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.discrete:
            log_p = F.log_softmax(policy_out, dim=-1)
            log_prob = log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            return log_prob, entropy
        log_std = self._log_std(model)
        z = (actions - policy_out) * torch.exp(-log_std)
        log_prob = (-0.5 * z.pow(2) - log_std - _LOG_SQRT_2PI).flatten(1).sum(-1)
        entropy = (0.5 + _LOG_SQRT_2PI + log_std).sum().expand(policy_out.shape[0])
        return log_prob, entropy

    def get_actions(
        self, model: nn.Module, observations: torch.Tensor, optimal: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_out, value = model(observations)
        if self.discrete:
            n = self.action_space.n if self.action_space is not None else policy_out.shape[-1]
            if policy_out.shape[-1] != n:
                raise ConfigError(
                    f"the model gives {policy_out.shape[-1]} action logits, "
                    f"but the environment has {n} actions"
                )
            if optimal:
                actions = policy_out.argmax(-1)
            else:
                actions = torch.multinomial(F.softmax(policy_out, dim=-1), 1).squeeze(-1)
        elif optimal:
            actions = policy_out
        else:
            actions = policy_out + torch.randn_like(policy_out) * self._log_std(model).exp()
        log_prob, _ = self._log_prob_entropy(model, policy_out, actions)
        return actions, {"log_probs": log_prob, "values": value.reshape(-1)}

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
        log_prob, entropy = self._log_prob_entropy(model, policy_out, batch["actions"])
        log_ratio = log_prob - batch["log_probs"]
        ratio = log_ratio.exp()
        advantages = batch["advantages"]
        if self._normalize_advantages and advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        clip = self.clip_range(state)
        policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
        value_loss = F.mse_loss(values.reshape(-1), batch["returns"])
        entropy_mean = entropy.mean()
        with torch.no_grad():
            approx_kl = ((ratio - 1) - log_ratio).mean()
            clip_fraction = ((ratio - 1).abs() > clip).float().mean()
            stats = [approx_kl, clip_fraction, entropy_mean.detach(), value_loss.detach()]
            self._stats.append(torch.stack(stats))
        if self._target_kl is not None:
            self._stop_update = bool(approx_kl > 1.5 * self._target_kl)  # one sync per minibatch
        # The terms of the objective, as weighted; rl/value_loss logs the unweighted value error.
        losses = {"policy_loss": policy_loss, "value_term": self._vf_coef * value_loss}
        if self._ent_coef:
            losses["entropy_term"] = -self._ent_coef * entropy_mean
        return losses

    def should_stop_update(self) -> bool:
        return self._stop_update

    def on_step_end(
        self, state: State, loss_dict: dict[str, torch.Tensor], model: nn.Module, optim: Any, lr_sched: Any
    ) -> None:
        """Logs the iteration's mean approximate KL, clip fraction and entropy (lazily)."""
        if self._stats:
            stats = torch.stack(self._stats)
            mean = lambda i: lambda: stats[:, i].mean()  # noqa: E731
            self.logger.log_scalar("approx_kl", mean(0), namespace="rl")
            self.logger.log_scalar("clip_fraction", mean(1), namespace="rl")
            self.logger.log_scalar("entropy", mean(2), namespace="rl")
            self.logger.log_scalar("value_loss", mean(3), namespace="rl")
            self.logger.log_scalar("clip_range", self.clip_range(state), namespace="rl")
        self._stats = []
        self._stop_update = False
