"""Rollouts of a continuous model through the Gaussian steps of a stochastic solver, and the per-step KL between
two models' steps: what VARD, DRaFT and DDPO (:mod:`genkit.finetune.vard`, :mod:`genkit.finetune.baselines`) share.

**The chain.** A continuous genkit model (diffusion, flow matching, a diffusers UNet loaded by
``genkit.from_diffusers``, any field with a path) sampled by a stepwise solver whose steps are Gaussian draws
(``gaussian_transitions``: ``ancestral`` with ``eta > 0`` (DDPM / DDIM-eta), ``euler_maruyama`` with fresh noise on
the model's SDE) is a Markov chain ``x_{t_0} -> ... -> x_{t_N}`` with ``p_theta(x_{n+1} | x_n) = N(mu_theta(x_n),
std_n^2 I)``. The grid is the one the model's ODE sampler would use (:meth:`genkit.sampling.ODESampler.plan`: the
model's time range; a diffusion model ends with the deterministic final denoising step ``E[x_0 | x_{t_N}]``,
``end_x0``). ``std_n`` depends on the schedule and the grid only, never on the network, so two models on one grid
share it. A step with ``std_n = 0`` (Euler-Maruyama's last step onto ``t = 0``, ancestral's onto ``sigma = 0``) is
deterministic and has no density; the methods leave it out of their KL and log-probability sums (its state is
``mu_theta(x_n)``), so nothing ties it to the pretrained step. With a KL penalty, end the grid with a Gaussian step
(``Uniform(1.0, t_min)`` with ``t_min > 0``, or a diffusion model's grid, which ends at ``t_eps``) so that it
reaches the whole chain: measured on the 2-D toy of tests/test_vard.py, DRaFT with ``eta = 2`` on a grid ending in a
deterministic step collapsed every sample onto the reward's maximum (through that unpenalised step), and on
``Uniform(1.0, 0.02)`` moved toward the tilted target. A diffusion model's final denoising step ``E[x_0 |
x_{t_eps}]`` is deterministic too (and small: a denoiser at ``t_eps``).

**The per-step KL** of two Gaussians with the same covariance ``std_n^2 I`` is
``KL(N(mu_1, s^2 I) || N(mu_2, s^2 I)) = ||mu_1 - mu_2||^2 / (2 s^2)``, summed over the non-batch dimensions
(:func:`step_kl`). Summed over the steps, its expectation under ``p_theta`` is the KL of the two chains' path laws
(the chain rule of KL), which bounds the KL of the final samples' laws from above.

**Conditioning.** ``cond`` (``labels=`` class ids ``[B]``) goes to every model call and the solver's init.

Solvers whose state carries memory (multistep history, a Brownian tree) cannot be restarted at a stored state, so
they are refused; so are solvers without Gaussian transitions (``euler``, ``heun``, ``ddim``, ``edm``): a
:class:`~genkit.errors.ConfigError` naming ``ancestral`` and ``euler_maruyama``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..fields import as_x0, check_field
from ..frozen import Frozen
from ..sampling import ODESampler
from ..solvers import Solver, SolverState, TimeGrid, Transition
from ..solvers.base import solve_times
from .checks import _int, _real
from .rewards import Reward, as_reward

__all__ = ["GaussianChain", "ChainRollout", "ChainObjective", "step_kl", "check_policy_pair", "check_labels",
           "draw_cond", "draw_prior"]


def step_kl(mean: Tensor, ref_mean: Tensor, std: float | Tensor) -> Tensor:
    """``||mean - ref_mean||^2 / (2 std^2)`` summed over the non-batch dimensions: ``[B]``, the KL of two Gaussian
    steps that share the covariance ``std^2 I`` (``std > 0``)."""
    return (mean - ref_mean).square().flatten(1).sum(1) / (2 * std ** 2)


@dataclass
class ChainRollout:
    """One batch of trajectories: ``states[n]`` the solver state at ``times[n]`` (``n = 0..N``; ``states[n +
    1].transition`` the law it was drawn from), ``samples`` the final samples (``states[N].x``, or the final
    denoising step of it), ``cond`` the conditioning it was drawn with."""

    states: list[SolverState]
    samples: Tensor
    cond: dict[str, Any]

    @property
    def noisy(self) -> list[int]:
        """The steps ``n`` whose draw ``x_{n+1}`` is Gaussian (std > 0)."""
        return [n for n in range(len(self.states) - 1) if not self.states[n + 1].transition.deterministic]


class GaussianChain:
    """``GaussianChain(solver="ancestral", steps=None, grid="uniform")``: a stochastic solver with Gaussian steps on
    a model's sampling grid (see the module docstring). ``steps`` None means the ODE sampler's 32."""

    def __init__(self, solver: str | Solver = "ancestral", steps: int | None = None,
                 grid: str | TimeGrid | Tensor | Sequence[float] = "uniform", *, method: str = "this method"):
        self.sampler = ODESampler(solver, steps, grid)
        s = self.solver = self.sampler._solver
        if not (s.gaussian_transitions and s.stepwise):
            kind = "stochastic, but its step is not one Gaussian draw" if s.stochastic else "deterministic"
            raise ConfigError(f"{method} needs a stochastic solver whose steps are Gaussian draws with a density "
                              f"(log-probabilities, a closed-form KL); solver {s.name!r} is {kind}. Use "
                              "solver='ancestral' (DDPM; get_solver('ancestral', eta=...) for DDIM-eta) or "
                              "'euler_maruyama' (the model's SDE)")
        if getattr(s, "noise", "fresh") != "fresh":
            raise ConfigError(f"{method} restarts the chain at stored states, so each step's noise must be a fresh "
                              f"draw; {s!r} follows one Brownian path per sample. Use noise='fresh'")
        self.method = method

    def config(self) -> dict[str, Any]:
        """The solver, step count and grid as JSON values (a grid object by its class and settings)."""
        grid = self.sampler.grid
        if torch.is_tensor(grid) or isinstance(grid, (list, tuple)):
            grid = [float(t) for t in grid]
        elif not isinstance(grid, str):
            grid = {"grid": type(grid).__name__, **{k: v for k, v in sorted(vars(grid).items())
                                                    if v is None or isinstance(v, (bool, int, float, str))}}
        return {"solver": repr(self.solver), "steps": self.sampler.steps, "grid": grid}

    def plan(self, model: Any) -> tuple[Any, Tensor, bool]:
        """``(field, times, end_x0)``: the field the solver steps (x0-limited when the model asks for it), the
        grid ``[N + 1]`` (float64) and whether the samples are the final denoising step of the last state."""
        field, grid, steps, cut = self.sampler.plan(model)
        check_field(field)
        if cut is not None and len(cut) == 2:
            raise ConfigError(f"{self.method}: a single step onto t = 0 is the final denoising step alone, with no "
                              "Gaussian step to fine-tune; use steps >= 2")
        times = solve_times(field, self.solver, steps, grid)
        end_x0 = float(times[-1]) > 0 and bool(getattr(model, "denoise_end", False))
        return field, times, end_x0

    def field(self, model: Any) -> Any:
        """The field the solver steps for ``model`` (x0-limited when it asks for it), without a grid: a reference's
        steps are taken on the fine-tuned model's states and grid."""
        field = self.sampler.plan(model)[0]
        check_field(field)
        return field

    def init(self, field: Any, x: Tensor, times: Tensor, generator: torch.Generator | None,
             cond: dict[str, Any]) -> SolverState:
        return self.solver.init(field, x, times, generator=generator, **cond)

    def transition(self, field: Any, state: SolverState, cond: dict[str, Any]) -> Transition:
        """The law of the step from ``state`` under ``field`` (one field evaluation; gradients as the field's)."""
        return self.solver.transition(field, state, **cond)

    def rollout(self, field: Any, x: Tensor, times: Tensor, end_x0: bool, cond: dict[str, Any], *,
                generator: torch.Generator | None = None, grad_steps: int = 0) -> ChainRollout:
        """Trajectories from the prior draw ``x [B, ...]``: the first ``N - grad_steps`` steps without gradients
        (their states detached), the last ``grad_steps`` (and the final denoising step, when ``grad_steps > 0``)
        with them. Each step is the solver's own ``step`` (its draws, its transition on the new state)."""
        num = len(times) - 1
        with torch.no_grad():
            state = self.init(field, x, times, generator, cond)
            states = [state]
            for _ in range(num - grad_steps):
                state = self.solver.step(field, state, generator=generator, **cond)
                states.append(state)
        if state.memory:
            raise ConfigError(f"{self.method} restarts the chain at stored states; solver {self.solver.name!r} keeps "
                              "memory between steps. Use 'ancestral' or 'euler_maruyama'")
        state = state.detach()
        for _ in range(grad_steps):
            state = self.solver.step(field, state, generator=generator, **cond)
            states.append(state)
        rollout = ChainRollout(states, self.finish(field, state.x, times, end_x0, cond, grad=grad_steps > 0), cond)
        if not rollout.noisy:
            raise ConfigError(f"{self.method}: every step of {self.solver!r} on this grid is deterministic (std 0: "
                              "eta = 0?), so there is no Gaussian step to score or regularise; use eta > 0")
        return rollout

    def finish(self, field: Any, x: Tensor, times: Tensor, end_x0: bool, cond: dict[str, Any], *,
               grad: bool = True) -> Tensor:
        """The samples of last states ``x``: ``E[x_0 | x_{t_N}]`` when the model ends with a denoising step."""
        if not end_x0:
            return x
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return as_x0(field)(x, float(times[-1]), **cond)

    def at(self, rollout: ChainRollout, n: int) -> SolverState:
        """State ``n`` of ``rollout`` cut from any graph, to restart a step from."""
        return rollout.states[n].detach()


def check_policy_pair(model: Any, reference: Any, method: str) -> None:
    """``model`` (trainable module with ``sample_shape``, a field) and its frozen ``reference`` (a field on the same
    path, in any prediction: the pretrained model it was copied from)."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{method}: model must be the nn.Module to fine-tune (a copy of the pretrained model); got "
                          f"{type(model).__name__}")
    check_field(model)
    check_field(reference)
    if reference is model:
        raise ConfigError(f"{method}: model and reference are the same object; fine-tune a copy: "
                          f"{method}(copy.deepcopy(pretrained), pretrained, reward, ...)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{method}: model has no trainable parameters (all requires_grad=False), so fine-tuning "
                          "would change nothing; pass copy.deepcopy(pretrained).requires_grad_(True)")
    if getattr(model, "sample_shape", None) is None:
        raise ConfigError(f"{method}: model needs sample_shape (the shape of one sample) to draw its prior; "
                          f"{type(model).__name__} has none")
    if reference.path != model.path:
        raise ConfigError(f"{method}: reference is on the {reference.path!r} path but model on {model.path!r}; the "
                          "two chains must share the schedule (fine-tune a copy of the reference)")


def check_labels(labels: Any, model: Any, method: str) -> Tensor | None:
    """The class ids rollouts draw their labels from (uniformly), as a 1-D long tensor, or None (unconditional)."""
    k = getattr(model, "num_classes", None)
    if labels is None:
        if k is not None:
            raise ConfigError(f"{method}: model is class-conditional ({k} classes); give labels= the class ids to "
                              f"fine-tune on, e.g. labels=range({k})")
        return None
    labels = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels).reshape(-1)
    if labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ConfigError(f"{method}: labels must be integer class ids (at least one); got {labels.tolist()}")
    if k is None:
        raise ConfigError(f"{method}: model is unconditional (num_classes None) and takes no labels; drop labels=")
    null = getattr(model, "null_label", None)
    bad = [c for c in labels.tolist() if not (0 <= c < k or c == null)]
    if bad:
        raise ConfigError(f"{method}: labels {bad} are not classes of the model (0..{k - 1}"
                          + (f", or its null label {null}" if null is not None else "") + ")")
    return labels.long()


def draw_cond(labels: Tensor | None, b: int, generator: torch.Generator | None,
              device: torch.device) -> dict[str, Any]:
    """``{"labels": [b]}`` drawn uniformly from ``labels`` with ``generator`` (``{}`` when unconditional)."""
    if labels is None:
        return {}
    on = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randint(len(labels), (b,), generator=generator, device=on)
    return {"labels": labels.to(on)[idx].to(device)}


def draw_prior(model: Any, b: int, generator: torch.Generator | None) -> Tensor:
    """``b`` prior draws ``[b, *sample_shape]`` of ``model`` in its parameters' dtype and device."""
    p = next(model.parameters())
    return model.path.sample_prior((b, *model.sample_shape), generator=generator, device=p.device, dtype=p.dtype)


class ChainObjective(nn.Module):
    """What VARD, DRaFT and DDPO share: a data-free objective on ``model`` (a copy of the pretrained one) with the
    frozen ``reference`` and ``reward`` (:class:`genkit.frozen.Frozen`), the KL weight ``eta`` (``> 0`` when
    ``eta_positive``), the :class:`GaussianChain` its rollouts run on, the labels they draw, and the
    ``reward_queries`` counter (a buffer, so resume keeps it) of training-mode queries."""

    data_free = True

    def __init__(self, method: str, model: nn.Module, reference: Any, reward: Reward | Any, eta: float,
                 solver: str | Solver, steps: int | None, grid: Any, batch_size: int, labels: Any, *,
                 eta_positive: bool = False, eta_help: str = "It is the KL weight (0: none)."):
        super().__init__()
        check_policy_pair(model, reference, method)
        self.eta = _real("eta", eta, eta_help, positive=eta_positive)
        self.batch_size = _int("batch_size", batch_size, 1, "It is the trajectories per rollout.")
        self.chain = GaussianChain(solver, steps, grid, method=method)
        self.labels = check_labels(labels, model, method)
        self.model = model
        self.frozen = Frozen(reference=reference, reward=as_reward(reward))
        self.register_buffer("reward_queries", torch.zeros((), dtype=torch.int64))

    @property
    def reference(self) -> Any:
        return self.frozen.reference

    @property
    def reward(self) -> Reward:
        return self.frozen.reward

    def _count(self, n: int) -> None:
        """Count ``n`` reward queries (training-mode calls with gradients only)."""
        if self.training and torch.is_grad_enabled():
            self.reward_queries += n
