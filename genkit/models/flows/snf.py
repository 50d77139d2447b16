"""Stochastic normalizing flows (Wu, Köhler, Noé 2020; METHODS.md section 12).

A :class:`StochasticFlow` is a list of layers applied in *sampling order* (prior -> target): deterministic genkit
flow transforms (whose ``forward`` maps data -> base, so sampling runs their ``inverse``) mixed with stochastic
blocks (:class:`LangevinBlock`, :class:`MetropolisBlock`) that target :class:`InterpolatedEnergy`
``u_lambda = (1 - lambda) u_prior + lambda u_target``. Every layer adds its path term ``Delta S`` (a log-det for
a deterministic layer, the backward/forward path log ratio for a stochastic one), so the importance weight

    log w = -u_X(x) - log p_Z(z) + sum Delta S

is exact without marginalising the noise.

Conventions:

- ``u_Z`` is the *normalised* prior energy ``-log N(z; 0, I)`` (:meth:`StochasticFlow.prior_energy`), so
  ``E[w] = Z = ∫ exp(-u_X)`` and ``mean(exp(log w))`` estimates the target's ``Z`` itself
  (:func:`genkit.metrics.log_z`); self-normalised averages (:func:`genkit.metrics.reweighted_mean`) do not need it.
- ``u_X`` is the target's ``energy`` in kT; the stochastic blocks' interpolated energies use the *unnormalised*
  ``0.5 |x|^2`` for the prior end (a constant does not change their dynamics or their ``Delta S``).
- ``-mean(log w)`` (the energy loss) is ``KL(forward path || backward path) - log Z >= -log Z``; the ML loss
  ``mean(u_Z(z) - sum Delta S)`` on data is, for deterministic layers only, the flow's negative log-likelihood.
- Gradients flow through the reparameterised Langevin path (forces by autograd with ``create_graph``) and through
  the accepted Metropolis positions (the accept mask is a constant).
- A plain flow is the deterministic-only case: ``StochasticFlow(list(flow.transforms)[::-1], D)`` has the same
  samples, ``log w`` and ML loss as ``flow`` (tests/test_snf.py checks it), and satisfies the trainer's
  ``config()`` contract.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError, DataError, ShapeError
from .circular import wrap
from .flow import Flow
from .transforms import Permutation, Transform

__all__ = ["InterpolatedEnergy", "LangevinBlock", "MetropolisBlock", "StochasticFlow", "EnergyObjective",
           "MLObjective", "MixedObjective", "flow_log_weights"]


def _prior_energy(x: Tensor) -> Tensor:
    return 0.5 * (x * x).sum(1)


def _check_finite(u: Tensor, x: Tensor, what: str) -> Tensor:
    bad = ~torch.isfinite(u)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"{what} is not finite at {int(bad.sum())} of {u.shape[0]} inputs (first x[{i}] = "
                        f"{x[i].detach().tolist()}); reduce the stochastic blocks' step size or check the energy "
                        "for NaN/inf inside its bounds")
    return u


class InterpolatedEnergy:
    """``u_lambda(x) = (1 - lambda) * u_prior(x) + lambda * target.energy(x)`` and its force ``-grad u_lambda``:
    ``u_prior = 0.5 |x|^2`` (the standard Normal) on R^d, ``0`` (the uniform prior) for a torus energy
    (``target.domain == "torus"``)."""

    def __init__(self, target: Any, lam: float):
        if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and 0.0 <= float(lam) <= 1.0):
            raise ConfigError(f"interpolation lambda must be a number in [0, 1]; got lam={lam!r}")
        if not callable(getattr(target, "energy", None)):
            raise ConfigError(f"the target must be a genkit Energy (with .energy(x)); got {type(target).__name__}")
        self.target, self.lam = target, float(lam)
        self.uniform_prior = getattr(target, "domain", "real") == "torus"

    def energy(self, x: Tensor) -> Tensor:
        u = x.new_zeros(x.shape[0]) if self.uniform_prior else (1.0 - self.lam) * _prior_energy(x)
        if self.lam > 0:
            u = u + self.lam * self.target.energy(x)
        return _check_finite(u, x, f"interpolated energy (lambda={self.lam})")

    def force(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """``-grad u_lambda(x)``; with ``create_graph`` it stays differentiable in whatever ``x`` came from."""
        with torch.enable_grad():
            xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.energy(xg).sum(), xg, create_graph=create_graph)
        return -g


def _check_step(name: str, value: Any) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0; got {value!r} (typical: 1e-3 .. 0.1)")
    return float(value)


def _check_steps(n: Any) -> int:
    if isinstance(n, bool) or not (isinstance(n, int) and n >= 1):
        raise ConfigError(f"n_steps must be an int >= 1; got {n!r}")
    return n


def _energy_config(target: Any) -> Any:
    config = getattr(target, "config", None)
    return config() if callable(config) else type(target).__name__


def _block_config(block: nn.Module, kind: str) -> dict[str, Any]:
    e = block.energy
    return {"block": kind, "lam": e.lam, "step_size": block.step_size, "n_steps": block.n_steps,
            "target": _energy_config(e.target)}


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)


def _uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = x.device if generator is None else generator.device
    return torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=dev).to(x.device)


class LangevinBlock(nn.Module):
    """Overdamped Langevin on ``u_lambda``: ``n_steps`` of ``y = x + eps F(x) + sqrt(2 eps) eta``, each adding
    ``Delta S = 0.5 (|eta|^2 - |eta~|^2)`` with ``eta~ = (x - y - eps F(y)) / sqrt(2 eps)``."""

    stochastic = True

    def __init__(self, target: Any, lam: float, *, step_size: float = 0.01, n_steps: int = 1):
        super().__init__()
        if getattr(target, "domain", "real") != "real":
            raise ConfigError(f"LangevinBlock needs an energy on R^d; {type(target).__name__} lives on a "
                              f"{target.domain!r} (its Gaussian path term would not be exact there); use a "
                              "MetropolisBlock, which wraps its proposals on a torus")
        self.energy = InterpolatedEnergy(target, lam)
        self.step_size, self.n_steps = _check_step("LangevinBlock step_size", step_size), _check_steps(n_steps)

    def step(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        eps = self.step_size
        train = torch.is_grad_enabled()
        f_x = self.energy.force(x, create_graph=train)
        eta = _noise(x, generator)
        y = x + eps * f_x + math.sqrt(2 * eps) * eta
        f_y = self.energy.force(y, create_graph=train)
        eta_b = (x - y - eps * f_y) / math.sqrt(2 * eps)
        return y, 0.5 * ((eta * eta).sum(1) - (eta_b * eta_b).sum(1))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for _ in range(self.n_steps):
            x, ds = self.step(x, generator)
            total = total + ds
        return x, total

    def config(self) -> dict[str, Any]:
        return _block_config(self, "langevin")


class MetropolisBlock(nn.Module):
    """Metropolis MC on ``u_lambda`` with the symmetric proposal ``y = x + step_size * eta``, accepted with
    ``min(1, exp(-(u(y) - u(x))))``; each accepted move adds ``Delta S = u_lambda(y) - u_lambda(x)`` (the accept
    mask is a constant for gradients, which flow through the accepted positions). On a torus energy
    (``target.domain == "torus"``) the proposal is wrapped into ``[-pi, pi)``: still symmetric, so detailed
    balance and ``Delta S`` hold on the box."""

    stochastic = True

    def __init__(self, target: Any, lam: float, *, step_size: float = 0.1, n_steps: int = 1):
        super().__init__()
        self.energy = InterpolatedEnergy(target, lam)
        self.step_size, self.n_steps = _check_step("MetropolisBlock step_size", step_size), _check_steps(n_steps)
        self.periodic = getattr(target, "domain", "real") == "torus"

    def step(self, x: Tensor, generator: torch.Generator | None = None, u_x: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        u_x = self.energy.energy(x) if u_x is None else u_x
        y = x + self.step_size * _noise(x, generator)
        if self.periodic:
            y = wrap(y)  # never exactly pi after rounding
        u_y = self.energy.energy(y)
        log_u = torch.log(_uniform(x, generator))
        accept = (log_u < -(u_y - u_x)).detach()
        a = accept.to(x.dtype)
        x_new = torch.where(accept[:, None], y, x)
        u_new = torch.where(accept, u_y, u_x)
        return x_new, a * (u_y - u_x), u_new

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        u = None
        for _ in range(self.n_steps):
            x, ds, u = self.step(x, generator, u)
            total = total + ds
        return x, total

    def config(self) -> dict[str, Any]:
        return _block_config(self, "metropolis")


class StochasticFlow(nn.Module):
    """``StochasticFlow(layers, features)``: ``layers`` in sampling order (prior -> target), each a genkit flow
    :class:`Transform` (run by its ``inverse`` when sampling, ``forward`` on the reverse pass) or a stochastic
    block. ``sample_with_log_weights(n, target, generator=)`` -> ``(x, log_w)``; ``reverse(x, generator=)`` ->
    ``(z, sum Delta S)`` for the maximum-likelihood loss.

    Every layer must act on ``features``: a transform built for another width, or a block whose target energy
    has another ``dim``, is a ConfigError. On R^d the prior is the standard Normal; with circular transforms
    (``domain == "circle"``, e.g. :class:`~genkit.models.flows.CircularCoupling`; permutations may sit between
    them), or with only stochastic blocks on torus energies, the flow lives on the torus ``[-pi, pi)^D`` with the
    uniform prior (``u_Z = D log 2 pi``), and its blocks must target torus energies (Metropolis: proposals
    wrapped; Langevin is refused there).
    :meth:`config` records the layers (transform class names, the
    blocks' ``lam`` / ``step_size`` / ``n_steps`` and target ``config()``) for the trainer's checkpoints; it
    is a record, not a recipe (a hand-built ``StochasticFlow`` is not rebuilt by ``genkit.load``: build the same
    layers and ``load_state_dict``; the registered ``snf`` family, :class:`StochasticNSF`, is)."""

    def __init__(self, layers: Sequence[nn.Module], features: int):
        super().__init__()
        if not (isinstance(features, int) and features >= 1):
            raise ConfigError(f"a StochasticFlow needs features >= 1; got features={features!r}")
        domains = {t.domain for t in layers if isinstance(t, Transform) and not isinstance(t, Permutation)}
        if domains - {"real", "circle"} or len(domains) > 1:
            raise ConfigError(f"a StochasticFlow's transforms act on R^d (the Normal prior) or all on the circle "
                              f"(the uniform prior on the torus); got transforms on {sorted(domains)}")
        targets = [getattr(getattr(b, "energy", None), "target", None) for b in layers if not isinstance(b, Transform)]
        on_torus = bool(targets) and all(getattr(t, "domain", "real") == "torus" for t in targets)
        # blocks alone on a torus energy start from the uniform prior there too
        self.domain = domains.pop() if domains else ("circle" if on_torus else "real")
        for i, layer in enumerate(layers):
            if isinstance(layer, Transform):
                if layer.features != features or layer.context_features:
                    raise ConfigError(f"StochasticFlow layer {i} ({type(layer).__name__}) must act on {features} "
                                      "features without a context")
            elif not getattr(layer, "stochastic", False):
                raise ConfigError(f"StochasticFlow layer {i} is a {type(layer).__name__}; use a genkit flow "
                                  "Transform, LangevinBlock or MetropolisBlock")
            else:
                dim = getattr(getattr(getattr(layer, "energy", None), "target", None), "dim", None)
                if isinstance(dim, int) and dim != features:
                    raise ConfigError(f"StochasticFlow layer {i} ({type(layer).__name__}) targets an energy of dim "
                                      f"{dim}, the flow has {features} features; build the block on a "
                                      f"{features}-D energy")
                torus = getattr(getattr(getattr(layer, "energy", None), "target", None), "domain", "real") == "torus"
                if self.domain == "circle" and not torus:
                    raise ConfigError(f"StochasticFlow layer {i} ({type(layer).__name__}) targets an energy on R^d, "
                                      "but the flow's circular transforms live on the torus; target a torus energy "
                                      "(domain 'torus', e.g. torus_dihedral)")
        self.layers = nn.ModuleList(layers)
        self.features = features
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    def config(self) -> dict[str, Any]:
        """``{"family": "stochastic_flow", "features": D, "layers": [...]}`` (JSON values; see the class doc)."""
        layers: list[Any] = []
        for layer in self.layers:
            if isinstance(layer, Transform):
                layers.append({"transform": type(layer).__name__, "features": layer.features})
            else:
                cfg = getattr(layer, "config", None)
                layers.append(cfg() if callable(cfg) else {"block": type(layer).__name__})
        return {"family": "stochastic_flow", "features": self.features, "layers": layers}

    def prior_energy(self, z: Tensor) -> Tensor:
        """The normalised prior energy ``u_Z``: ``-log N(z; 0, I)`` on R^d, ``D log 2 pi`` (uniform) on the torus."""
        if self.domain == "circle":
            return z.new_full((z.shape[0],), self.features * math.log(2 * math.pi))
        return _prior_energy(z) + 0.5 * self.features * math.log(2 * math.pi)

    def run_path(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(x, sum Delta S)`` for prior draws ``z [n, D]``: one pass prior -> target, transforms by their
        ``inverse`` (``Delta S`` their log-det), blocks with their noise from ``generator``."""
        x, total = z, z.new_zeros(z.shape[0])
        for layer in self.layers:
            x, ds = layer.inverse(x) if isinstance(layer, Transform) else layer(x, generator)
            total = total + ds
        return x, total

    def path_log_weights(self, z: Tensor, target: Any, generator: torch.Generator | None = None
                         ) -> tuple[Tensor, Tensor]:
        """``(x, log w)`` of the paths from prior draws ``z``: ``log w = -u_X(x) + u_Z(z) + sum Delta S``."""
        x, ds = self.run_path(z, generator)
        return x, -_check_finite(target.energy(x), x, "the target energy") + self.prior_energy(z) + ds

    def _prior_draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        if not (isinstance(n, int) and n >= 1):
            raise ConfigError(f"number of samples must be an int >= 1; got n={n!r}")
        dev = self._ref.device if generator is None else generator.device
        draw = torch.rand if self.domain == "circle" else torch.randn
        z = draw(n, self.features, generator=generator, dtype=self._ref.dtype, device=dev).to(self._ref.device)
        return (2 * z - 1) * math.pi if self.domain == "circle" else z

    def sample_with_path(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, u_Z(z), sum Delta S)`` from one forward (prior -> target) pass."""
        z = self._prior_draw(n, generator)
        x, total = self.run_path(z, generator)
        return x, self.prior_energy(z), total

    def sample_with_log_weights(self, n: int, target: Any, *, generator: torch.Generator | None = None
                                ) -> tuple[Tensor, Tensor]:
        """``(x [n, D], log_w [n])`` with ``log w = -u_X(x) + u_Z(z) + sum Delta S``; ``u_X = target.energy``."""
        return self.path_log_weights(self._prior_draw(n, generator), target, generator)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_with_path(n, generator)[0]

    def reverse(self, x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Data -> prior: ``(z, sum Delta S)``, transforms by their ``forward``, stochastic blocks by the same
        dynamics (detailed balance), in reverse order. ``ML loss = mean(u_Z(z) - sum Delta S)``."""
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ShapeError(f"StochasticFlow.reverse expects x [batch, {self.features}]; got {tuple(x.shape)}")
        total = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers):
            if isinstance(layer, Transform):
                x, ds = layer(x)
            else:
                x, ds = layer(x, generator)
            total = total + ds
        return x, total


def flow_log_weights(model: nn.Module, n: int, target: Any, *, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
    """``(x, log_w)`` for a :class:`StochasticFlow` or a plain :class:`Flow` (``log w = -u_X(x) - log q(x)``)."""
    if isinstance(model, StochasticFlow):
        return model.sample_with_log_weights(n, target, generator=generator)
    if isinstance(model, Flow):
        x, logq = model.sample_and_log_prob(n, generator=generator)
        return x, -_check_finite(target.energy(x), x, "the target energy") - logq
    raise ConfigError(f"expected a StochasticFlow or a Flow; got {type(model).__name__}")


def _check_batch(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size must be an int >= 1; got {batch_size!r}")
    return batch_size


def _check_model(model: Any, who: str) -> nn.Module:
    if not isinstance(model, (StochasticFlow, Flow)):
        raise ConfigError(f"{who} trains a StochasticFlow or a Flow; got {type(model).__name__}")
    return model


def _check_target(target: Any, model: nn.Module) -> Any:
    if not callable(getattr(target, "energy", None)):
        raise ConfigError(f"the target must be a genkit Energy (with .energy(x)); got {type(target).__name__}")
    dim = getattr(target, "dim", None)
    if isinstance(dim, int) and dim != model.features:
        raise ConfigError(f"the target energy has dim {dim}, the model {model.features} features; use an energy "
                          "of the model's width")
    return target


def _kl_loss(model: nn.Module, target: Any, batch_size: int, generator: torch.Generator | None) -> Tensor:
    _, log_w = flow_log_weights(model, batch_size, target, generator=generator)
    return -log_w.mean()


def _ml_loss(model: nn.Module, batch: Any, generator: torch.Generator | None) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise ConfigError(f"the ML loss needs a batch of samples [batch, {model.features}]; got "
                          f"{type(x).__name__} (a data-free run trains with EnergyObjective)")
    if isinstance(model, Flow):
        return -model.log_prob(x).mean()
    z, ds = model.reverse(x, generator=generator)
    return (model.prior_energy(z) - ds).mean()


class EnergyObjective(nn.Module):
    """Reverse KL / energy loss ``-mean(log w) = mean(u_X(x) - u_Z(z) - sum Delta S)`` over ``batch_size``
    samples of the model's own forward path (``u_Z(z)`` only shifts it: its expectation is the prior's entropy),
    which equals ``KL(path || target path) - log Z``. Data-free (``data_free = True``): ``Trainer(...).fit()``
    takes no data. Trains a :class:`StochasticFlow` or a plain :class:`Flow`."""

    data_free = True

    def __init__(self, model: nn.Module, target: Any, *, batch_size: int = 128):
        super().__init__()
        self.model = _check_model(model, "EnergyObjective")
        self.target, self.batch_size = _check_target(target, model), _check_batch(batch_size)

    def config(self) -> dict[str, Any]:
        return {"objective": "energy", "batch_size": self.batch_size, "target": _energy_config(self.target)}

    def loss(self, batch: Any = None, generator: torch.Generator | None = None, **_: Any
             ) -> tuple[Tensor, dict[str, float]]:
        loss = _kl_loss(self.model, self.target, self.batch_size, generator)
        return loss, {"kl": float(loss.detach())}


class MLObjective(nn.Module):
    """Maximum likelihood on samples ``x`` (the batch, or its first element): ``mean(u_Z(z) - sum Delta S)`` over
    the reverse (data -> prior) pass; for a plain Flow, or a StochasticFlow of deterministic layers only, the
    negative log-likelihood ``-mean(log q(x))``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = _check_model(model, "MLObjective")

    def config(self) -> dict[str, Any]:
        return {"objective": "ml"}

    def loss(self, batch: Any, generator: torch.Generator | None = None, **_: Any
             ) -> tuple[Tensor, dict[str, float]]:
        loss = _ml_loss(self.model, batch, generator)
        return loss, {"ml": float(loss.detach())}


class MixedObjective(nn.Module):
    """``w_ml * ML(batch) + w_kl * KL`` (the SNF paper's 0.5 : 0.5 phase, after an ML-only phase); the KL term
    draws ``batch_size`` samples of its own, the ML term uses the data batch."""

    def __init__(self, model: nn.Module, target: Any, *, w_ml: float = 0.5, w_kl: float = 0.5,
                 batch_size: int = 128):
        super().__init__()
        for name, w in (("w_ml", w_ml), ("w_kl", w_kl)):
            if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0; got {w!r}")
        if w_ml + w_kl <= 0:
            raise ConfigError("w_ml + w_kl must be > 0; set at least one weight")
        self.model = _check_model(model, "MixedObjective")
        self.target, self.batch_size = _check_target(target, model), _check_batch(batch_size)
        self.w_ml, self.w_kl = float(w_ml), float(w_kl)

    def config(self) -> dict[str, Any]:
        return {"objective": "mixed", "w_ml": self.w_ml, "w_kl": self.w_kl, "batch_size": self.batch_size,
                "target": _energy_config(self.target)}

    def loss(self, batch: Any, generator: torch.Generator | None = None, **_: Any
             ) -> tuple[Tensor, dict[str, float]]:
        l_ml = _ml_loss(self.model, batch, generator)
        l_kl = _kl_loss(self.model, self.target, self.batch_size, generator)
        return self.w_ml * l_ml + self.w_kl * l_kl, {"ml": float(l_ml.detach()), "kl": float(l_kl.detach())}
