"""VARD: value-based dense reward fine-tuning of continuous diffusion and flow models (Dai, Zhuang et al. 2025,
"VARD: Efficient and Dense Fine-Tuning for Diffusion Models with Value-based RL", arXiv 2505.15791; METHODS.md
section 5).

**No official code or full text was found**: this is reconstructed from the abstract and the mathematics below,
and every choice the sources leave open is stated as an assumption (A1-A6).

:class:`VARD` is a data-free objective (``data_free = True``) for :class:`genkit.train.Trainer` with two optimizers
(``optimizers()``: ``"policy"`` over the model, ``"value"`` over the value network; ``update(step)`` names which one
a step trains). The model is a continuous genkit model (a copy of the pretrained one) sampled by a stochastic
solver with Gaussian steps, ``p_theta(x_{n+1} | x_n) = N(mu_theta(x_n), std_n^2 I)`` on the model's sampling grid
``t_0 > ... > t_N`` (:class:`~genkit.finetune.gaussian_steps.GaussianChain`); the pretrained model (``reference``)
and the reward are frozen parts (:class:`genkit.frozen.Frozen`).

**The value** ``V_phi(x, t)`` of the current model's chain (a :class:`~genkit.finetune.ValueNetwork`, or any
module ``value(x, t [B], **cond) -> [B]``). A ``"value"`` update draws ``batch_size`` trajectories of the current
model without gradients, queries the reward once per final sample, and regresses (A1) on every state after a
Gaussian step ``n``:

    ``L(phi) = mean over samples and Gaussian steps n of (V_phi(x_{n+1}, t_{n+1}) - y_n)^2``
    ``y_n = r(x_0) - eta * sum_{m > n} KL_m``   (``value_target="soft"``, the default)
    ``y_n = r(x_0)``                            (``value_target="reward"``, the paper's ``E[r(x_0) | x_t]``)

with ``KL_m`` the closed-form KL of the current step ``m`` to the pretrained one (below) along the trajectory, so
the soft value is the expected KL-regularised return to go: the value whose one-step lookahead (the policy loss)
is the soft Bellman update of ``max E[r] - eta KL``. With the paper's plain ``E[r | x_t]`` the policy step ignores
the KL it commits later steps to; the two coincide at the pretrained model (every ``KL_m = 0``). Measured on
``eval/bench_finetune.py`` (digits, eta 0.1, 19200 reward queries): the plain value plateaus (classifier reward
0.81, pixel-mass reward 0.90) where the soft one keeps climbing (0.955, 0.957, at a lower path KL than DDPO's).
The minimiser over all functions is the conditional expectation of ``y_n`` (the states of one trajectory are
correlated, which leaves it unchanged; :mod:`genkit.finetune.svdd_value` regresses the same way). Only ``V_phi`` is
ever differentiated, so the reward may be non-differentiable (it is called under ``no_grad`` either way).
:func:`~genkit.finetune.collect_rollouts` + :func:`~genkit.finetune.fit_value` fit a value on the pretrained model
before fine-tuning; ``value_warmup`` does the same through the trainer.

**The policy** update draws ``batch_size`` trajectories of the current model without gradients (A2: on-policy,
no reward query) and, at every Gaussian step ``n`` (dense), restarts the step from the detached state ``x_n``:

    ``x_{n+1}(theta) = mu_theta(sg(x_n)) + sg(x_{n+1} - mu_theta(x_n))``    (the rollout's own noise, A3)
    ``L(theta) = mean over samples of sum_n [ -V_phi(x_{n+1}(theta), t_{n+1}) + eta * KL_n ]``
    ``KL_n = KL(p_theta(. | x_n) || p_pre(. | x_n)) = ||mu_theta(x_n) - mu_pre(x_n)||^2 / (2 std_n^2)``

summed over dimensions (the two steps share ``std_n``). ``x_{n+1}(theta)`` equals the rollout's state in value, so
``V`` is evaluated where the chain is; its gradient reaches ``theta`` through one step only. The per-step KLs sum
to the KL of the path laws (chain rule), so the objective is ``E_theta sum_n V(x_{n+1}) - eta KL(P_theta ||
P_pre)``; with ``V`` the exact soft value, the per-step terms are the one-step lookahead of the KL-regularised problem
``max E_theta[r(x_0)] - eta KL(P_theta || P_pre)``, whose optimal final law is the tilted
``p_pre(x_0) exp(r(x_0) / eta) / Z`` (METHODS.md section 0.5), the target the tests measure against (A4: the
summed, not averaged, form; ``eta`` is the temperature of that target).

Assumptions: (A1) least squares on the soft (KL-regularised, undiscounted) return to go by default, the paper's
final reward as an option; (A2) the policy and
the value steps draw their own trajectories; (A3) the reparameterised step uses the rollout's noise, so the
values are those of states the current chain visits; (A4) the policy loss sums over steps; (A5) deterministic
steps (Euler-Maruyama's last step onto ``t = 0``, a diffusion model's final denoising step ``E[x_0 | x_{t_N}]``)
carry no term: they have no density, and the value after the last Gaussian step already predicts the reward of
the sample they make; (A6) ``update(step)``: ``value_warmup`` value steps, then ``value_updates`` value steps and
``policy_updates`` policy steps in turn; (A7) value replay (a genkit choice; the sources say nothing on how often
the value is refit): with ``value_replay = R > 0`` each round adds ``R`` value steps that regress on the states and
targets stored by the last ``replay_batches`` fresh value steps, with no rollout and no reward query. The stored
targets were computed under the model of their round, so they lag the current chain by up to ``replay_batches``
rounds (the policy moves little per round); the replay memory is a set of buffers, so a resumed run continues
with it. On ``eval/bench_finetune.py`` (classifier reward, seed 0, 3840 queries) a fresh value step per 64 queries
alone reached reward 0.88; replaying 4 stored batches 4 times a round 0.92, and with 8 policy steps a round instead
of 4, 0.94 (the defaults).

Cost: a policy step is ``N`` rollout evaluations, ``N`` with gradients and ``N`` of the reference; a value step
``N`` evaluations (and ``N`` of the reference for the soft value) and ``batch_size`` reward queries
(:attr:`VARD.reward_queries` counts them); a replay step ``N`` value-network calls with gradients over
``replay_batches * batch_size`` stored states each, and no model call.

>>> import copy, torch
>>> from genkit.models import FAMILIES
>>> from genkit.nets import MLP
>>> from genkit.finetune import Reward, ValueNetwork
>>> pre, _ = FAMILIES.get("diffusion").example()
>>> reward = Reward(lambda x: -(x - 1).square().sum(-1), name="near1")
>>> obj = VARD(copy.deepcopy(pre), pre, reward, ValueNetwork(MLP(2, hidden=16, depth=1)), steps=4, batch_size=8)
>>> [obj.update(k) for k in (0, 9, 10, 11, 14, 15, 22, 23)]  # warm-up, then 1 fresh + 4 replay, 8 policy steps
['value', 'value', 'value', 'value', 'value', 'policy', 'policy', 'value']
>>> loss, logs = obj.loss(None, torch.Generator().manual_seed(0), update="policy")
>>> sorted(logs)
['kl', 'value']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError, ShapeError
from ..objective import ParamGroup
from ..solvers import Solver, TimeGrid
from .checks import _int, _real
from .gaussian_steps import ChainObjective, ChainRollout, draw_cond, draw_prior, step_kl
from .rewards import Reward

__all__ = ["VARD", "UPDATES"]

#: the two optimizers of VARD, by name
UPDATES = ("policy", "value")
#: what the value regresses on: the final reward (the paper), or the KL-regularised return to go
VALUE_TARGETS = ("reward", "soft")


def call_value(value: nn.Module, x: Tensor, t: float, cond: dict[str, Any]) -> Tensor:
    """``value(x [B, ...], t [B], **cond) -> [B]``, checked."""
    v = value(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), **cond)
    if not torch.is_tensor(v) or v.shape != (x.shape[0],) or not v.is_floating_point():
        got = f"{v.dtype} {tuple(v.shape)}" if torch.is_tensor(v) else type(v).__name__
        raise ShapeError(f"the value network must return one floating value per sample, [{x.shape[0]}]; got {got} "
                         "(squeeze its last dimension?)")
    return v


class VARD(ChainObjective):
    """``VARD(model, reference, reward, value, *, eta=1.0, solver="ancestral", steps=None, grid="uniform",
    batch_size=64, labels=None, value_warmup=10, value_updates=1, policy_updates=8, value_lr_scale=5.0,
    value_target="soft", value_replay=4, replay_batches=4)``; see the module docstring.

    Args:
        model: the continuous model to fine-tune (``copy.deepcopy(pretrained)``): an ``nn.Module`` field with
            ``path``, ``prediction`` and ``sample_shape``.
        reference: the frozen pretrained field (same path): a genkit model or an analytic field.
        reward: a :class:`~genkit.finetune.Reward` (or callable, wrapped non-differentiable) on final samples
            ``[B, *sample_shape]``; it is only ever queried under ``no_grad``.
        value: the value network ``value(x, t [B], **cond) -> [B]`` (:class:`~genkit.finetune.ValueNetwork`),
            trained by this objective (its weights are resume state, not model weights).
        eta: the KL weight (> 0), the temperature of the tilted target.
        solver, steps, grid: the stochastic solver with Gaussian steps and its grid (``ancestral``,
            ``euler_maruyama``), as for :class:`~genkit.sampling.ODESampler`.
        batch_size: trajectories per loss call.
        labels: for a class-conditional model, the class ids each trajectory's label is drawn from (uniformly);
            they go to the model, the reference and the value network as ``labels=``.
        value_warmup, value_updates, policy_updates: the update schedule (A6). The defaults (10 value steps first,
            then rounds of 1 fresh value step, the replay's steps and 8 policy steps, the value's lr 5x the
            policy's) are bench_finetune's: with 0 / 1 : 1 / 1x and no replay VARD reached 0.62 there after 3840
            queries where 10 / 1 : 4 / 5x reach 0.88 and the defaults 0.94 (policy lr 1e-4, so the value's 5e-4; on
            train/finetune.py's moons test at a policy lr of 1e-2 the 5x value lr did not learn and 1x does).
        value_lr_scale: the value network's learning rate relative to ``TrainConfig.lr``.
        value_target: ``"soft"`` (the KL-regularised return to go) or ``"reward"`` (the final reward, the paper's
            value): what the value regresses on.
        value_replay: value steps per round on the replay memory (A7; 0: off), after the round's
            ``value_updates`` fresh ones.
        replay_batches: the fresh value batches (states and targets) the replay memory keeps, the newest ones.
    """

    def __init__(self, model: nn.Module, reference: Any, reward: Reward | Any, value: nn.Module, *,
                 eta: float = 1.0, solver: str | Solver = "ancestral", steps: int | None = None,
                 grid: str | TimeGrid | Tensor | Sequence[float] = "uniform", batch_size: int = 64,
                 labels: Tensor | Sequence[int] | None = None, value_warmup: int = 10, value_updates: int = 1,
                 policy_updates: int = 8, value_lr_scale: float = 5.0, value_target: str = "soft",
                 value_replay: int = 4, replay_batches: int = 4):
        super().__init__("VARD", model, reference, reward, eta, solver, steps, grid, batch_size, labels,
                         eta_positive=True, eta_help="It is the KL weight, the temperature of the tilted target.")
        if not isinstance(value, nn.Module) or not any(p.requires_grad for p in value.parameters()):
            raise ConfigError(f"value must be a trainable nn.Module value(x, t) -> [B] (genkit.finetune.ValueNetwork("
                              f"MLP(dim))); got {type(value).__name__}")
        if any(p is q for p in value.parameters() for q in model.parameters()):
            raise ConfigError("the value network shares parameters with the model; give it its own network")
        self.value_warmup = _int("value_warmup", value_warmup, 0, "It is the value-only updates before the first "
                                 "policy update.")
        self.value_updates = _int("value_updates", value_updates, 1, "It is the value updates per round.")
        self.policy_updates = _int("policy_updates", policy_updates, 1, "It is the policy updates per round.")
        self.value_lr_scale = _real("value_lr_scale", value_lr_scale, "It scales TrainConfig.lr for the value.",
                                    positive=True)
        if value_target not in VALUE_TARGETS:
            raise ConfigError(f"value_target must be one of {VALUE_TARGETS}; got {value_target!r}")
        self.value_target = value_target
        self.value = value
        self.value_replay = _int("value_replay", value_replay, 0, "It is the value steps per round on the stored "
                                 "rollouts of earlier value steps (no reward queries; 0: off).")
        self.replay_batches = _int("replay_batches", replay_batches, 1, "It is the fresh value batches the replay "
                                   "keeps.")
        # the replay memory: the states after each step of the last replay_batches fresh value batches and their
        # regression targets, in buffers (resume keeps them); no memory when the replay is off
        _, times, _ = self.chain.plan(model)
        p = next(model.parameters())
        k, steps = (self.replay_batches if self.value_replay else 0), len(times) - 1
        self.register_buffer("replay_x", torch.zeros(k, steps, batch_size, *model.sample_shape, dtype=p.dtype,
                                                     device=p.device))
        self.register_buffer("replay_y", torch.zeros(k, steps, batch_size, dtype=p.dtype, device=p.device))
        self.register_buffer("replay_t", torch.zeros(steps, dtype=torch.float64, device=p.device))
        self.register_buffer("replay_noisy", torch.zeros(steps, dtype=torch.bool, device=p.device))
        self.register_buffer("replay_labels", torch.zeros(k, batch_size, dtype=torch.long, device=p.device))
        self.register_buffer("replay_stored", torch.zeros((), dtype=torch.int64))
        self._replay_due = False

    def config(self) -> dict[str, Any]:
        return {"eta": self.eta, **self.chain.config(), "batch_size": self.batch_size,
                "labels": None if self.labels is None else self.labels.tolist(), "value_warmup": self.value_warmup,
                "value_updates": self.value_updates, "policy_updates": self.policy_updates,
                "value_lr_scale": self.value_lr_scale, "value_target": self.value_target,
                "value_replay": self.value_replay, "replay_batches": self.replay_batches}

    # --- the objective contract -------------------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("policy", [p for p in self.model.parameters() if p.requires_grad]),
                ParamGroup("value", [p for p in self.value.parameters() if p.requires_grad],
                           lr_scale=self.value_lr_scale)]

    def optimizers(self) -> dict[str, list[str]]:
        return {"policy": ["policy"], "value": ["value"]}

    def update(self, step: int) -> str:
        """``"value"`` for the first ``value_warmup`` steps, then rounds of ``value_updates`` value steps on fresh
        rollouts, ``value_replay`` value steps on the stored ones and ``policy_updates`` policy steps. It also
        tells the next value loss which of the two kinds of value step ``step`` is."""
        self._replay_due = False
        if step < self.value_warmup:
            return "value"
        k = (step - self.value_warmup) % (self.value_updates + self.value_replay + self.policy_updates)
        self._replay_due = self.value_updates <= k < self.value_updates + self.value_replay
        return "value" if k < self.value_updates + self.value_replay else "policy"

    # --- rollouts -----------------------------------------------------------------------------------------------
    def rollout(self, n: int, generator: torch.Generator | None = None) -> ChainRollout:
        """``n`` trajectories of the current model, without gradients."""
        field, times, end_x0 = self.chain.plan(self.model)
        x = draw_prior(self.model, n, generator)
        cond = draw_cond(self.labels, n, generator, x.device)
        with torch.no_grad():
            return self.chain.rollout(field, x, times, end_x0, cond, generator=generator)

    def value_targets(self, roll: ChainRollout, r: Tensor) -> list[Tensor]:
        """The regression target of the value after each Gaussian step of ``roll``: ``r(x_0)``, or with
        ``value_target="soft"`` the KL-regularised return to go ``r(x_0) - eta * sum_{m > n} KL_m``."""
        if self.value_target == "reward":
            return [r for _ in roll.noisy]
        ref_field = self.chain.field(self.reference)
        with torch.no_grad():
            kls = [step_kl(roll.states[m + 1].transition.mean,
                           self.chain.transition(ref_field, self.chain.at(roll, m), roll.cond).mean,
                           roll.states[m + 1].transition.std) for m in roll.noisy]
        togo, out = torch.zeros_like(r), []
        for kl in reversed(kls):
            out.append(r - self.eta * togo)
            togo = togo + kl
        return out[::-1]

    def value_loss(self, roll: ChainRollout, store: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Least squares of the targets (:meth:`value_targets`) on the values after every Gaussian step of
        ``roll``; ``store``: keep the states and targets in the replay memory (when the replay is on)."""
        r = self.reward(roll.samples).to(roll.samples.dtype)
        self._count(r.shape[0])
        targets = self.value_targets(roll, r)
        if store and self.value_replay:
            self._store(roll, targets)
        errs = [(call_value(self.value, roll.states[n + 1].x, roll.states[n + 1].t, roll.cond) - y).square()
                for n, y in zip(roll.noisy, targets)]
        return torch.stack(errs).mean(), {"reward": r.mean().detach()}

    @torch.no_grad()
    def _store(self, roll: ChainRollout, targets: list[Tensor]) -> None:
        """Write ``roll``'s states after its Gaussian steps and their targets over the oldest stored batch."""
        j = int(self.replay_stored) % self.replay_batches
        self.replay_noisy.zero_()
        for n, y in zip(roll.noisy, targets):
            self.replay_noisy[n] = True
            self.replay_t[n] = roll.states[n + 1].t
            self.replay_x[j, n] = roll.states[n + 1].x
            self.replay_y[j, n] = y
        if "labels" in roll.cond:
            self.replay_labels[j] = roll.cond["labels"]
        self.replay_stored += 1

    def replay_loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Least squares of the stored targets on the values of the stored states (every stored batch, each
        Gaussian step one value call over all of them); no rollout and no reward query."""
        m = min(int(self.replay_stored), self.replay_batches)
        if m == 0:
            raise ConfigError("VARD's replay memory is empty: a replay value step needs a fresh value step first "
                              "(value_updates >= 1 precede the replay steps of a round)")
        cond = {} if self.labels is None else {"labels": self.replay_labels[:m].flatten()}
        errs = [(call_value(self.value, self.replay_x[:m, n].flatten(0, 1), float(self.replay_t[n]), cond)
                 - self.replay_y[:m, n].flatten()).square() for n in map(int, self.replay_noisy.nonzero().flatten())]
        return torch.stack(errs).mean(), {}

    def policy_terms(self, roll: ChainRollout) -> tuple[Tensor, Tensor]:
        """Per sample ``[B]``: ``sum_n V(x_{n+1}(theta), t_{n+1})`` and ``sum_n KL_n`` over the Gaussian steps of
        ``roll`` (a trajectory of the current model), each step restarted from its detached state."""
        field = self.chain.field(self.model)
        ref_field = self.chain.field(self.reference)
        values, kls = 0.0, 0.0
        for n in roll.noisy:
            state, nxt = self.chain.at(roll, n), roll.states[n + 1]
            tr = self.chain.transition(field, state, roll.cond)
            with torch.no_grad():
                ref = self.chain.transition(ref_field, state, roll.cond)
            x_next = tr.mean + (nxt.x - nxt.transition.mean).detach()
            values = values + call_value(self.value, x_next, nxt.t, roll.cond)
            kls = kls + step_kl(tr.mean, ref.mean, tr.std)
        return values, kls

    def loss(self, batch: Any, generator: torch.Generator | None = None, update: str = "policy",
             replay: bool | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``update``'s loss (``"policy"`` or ``"value"``) on ``batch_size`` fresh trajectories drawn from
        ``generator``; ``batch`` must be None (data-free). A value loss with ``replay`` (None: as the step last
        named by :meth:`update` is) is instead the replay memory's (:meth:`replay_loss`); a training-mode fresh
        value loss stores its rollout there (when ``value_replay > 0``)."""
        check_generator(generator, "VARD.loss")
        if batch is not None:
            raise ConfigError("VARD is data-free (its rollouts are its samples); call loss(None, generator) and "
                              "Trainer.fit() without data")
        if update not in UPDATES:
            raise ConfigError(f"update must be one of {UPDATES}; got {update!r}")
        if update == "value" and (self._replay_due if replay is None else replay):
            loss, logs = self.replay_loss()
            return loss, {**logs, "value_mse": loss.detach()}
        roll = self.rollout(self.batch_size, generator)
        if update == "value":
            loss, logs = self.value_loss(roll, store=self.training and torch.is_grad_enabled())
            return loss, {**logs, "value_mse": loss.detach()}
        values, kls = self.policy_terms(roll)
        loss = (-values + self.eta * kls).mean()
        return loss, {"value": values.detach().mean() / len(roll.noisy), "kl": kls.detach().mean()}
