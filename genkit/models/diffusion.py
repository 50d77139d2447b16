"""Gaussian diffusion trained by denoising (Ho et al. 2020, arXiv 2006.11239; Kingma et al. 2021,
arXiv 2107.00630), in any parametrization and with the common loss weightings.

Training draws ``t ~ U[t_eps, t_max]``, ``x_t = alpha x_0 + sigma eps`` and regresses the network on the
target of its parametrization (``eps``, ``x0``, ``v`` or ``velocity``). Weightings, all expressed per
parametrization so that they mean the same thing whatever the network predicts:

- ``uniform``: plain MSE in the network's own parametrization;
- ``min_snr``: Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556): x0-space weight ``min(SNR, gamma)``;
- ``edm``: EDM's ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` in x0 space (Karras et
  al. 2022, arXiv 2206.00364) with ``sigma = sigma_t / alpha_t``.

An x0-space weight ``W`` becomes ``W / k^2`` in a parametrization whose error is ``k`` times the x0 error
(``k^2 = SNR`` for eps, ``(alpha^2 + sigma^2)^2 / sigma^2`` for v, ``(alpha sigma' - sigma alpha')^2 / sigma^2``
for velocity). The network sees ``x_t / sqrt(alpha^2 sigma_data^2 + sigma^2)`` (EDM's ``c_in``), which is
the identity on variance-preserving paths with ``sigma_data = 1``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError, TimeGridError
from ..paths import Path, X0Limit, get_path, path_from_config
from ..sampling import ODESampler, Sampler
from ..solvers import TimeGrid, get_grid
from .continuous import ContinuousModel
from .registry import FAMILIES

__all__ = ["Diffusion", "WEIGHTINGS"]

WEIGHTINGS = ("uniform", "min_snr", "edm")


@FAMILIES.register("diffusion")
class Diffusion(ContinuousModel):
    """A diffusion model: ``Diffusion(net, path="cosine", prediction="eps", weighting="uniform")``.

    Args:
        net: ``net(x, t) -> Tensor`` shaped like x (a genkit network).
        path: a Path or its name (``cosine``, ``ddpm``, ``ve``, ``linear``).
        prediction: ``v`` (default), ``eps``, ``x0`` or ``velocity``. ``v`` stays well conditioned where
            alpha -> 0 (Salimans & Ho 2022, arXiv 2202.00512); ``eps`` does not (below).
        weighting: ``uniform``, ``min_snr`` or ``edm``.
        sample_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
        sigma_data: data standard deviation (input scaling and EDM weighting).
        min_snr_gamma: gamma of Min-SNR.
        t_eps: smallest training time.
        t_max: largest time used in training and the default start of sampling. Default 1; when the path
            reaches alpha = 0 and the network predicts eps, the time of log-SNR -5 (alpha/sigma = 0.08):
            eps carries no information on x_0 near alpha = 0 and errors in it are amplified by
            1/alpha (the zero-terminal-SNR problem of Lin et al. 2023, arXiv 2305.08891).
        num_classes, class_names, null_label, class_dropout: a class-conditional model (see
            :class:`~genkit.models.continuous.ContinuousModel`).
        x0_limit: x0 clipping or dynamic thresholding while sampling (:class:`genkit.paths.X0Limit`, or a dict
            of its options, e.g. ``{"clip_sample": True}``), honoured by every solver; None: none.

    >>> import torch
    >>> from genkit.nets import MLP
    >>> model = Diffusion(MLP(2, hidden=32), "cosine", sample_shape=(2,))
    >>> loss, _ = model.loss(torch.randn(8, 2), generator=torch.Generator().manual_seed(0))
    >>> loss.ndim
    0
    """

    family = "diffusion"

    def __init__(self, net: nn.Module, path: Path | str = "cosine", prediction: str = "v",
                 weighting: str = "uniform", *, sample_shape: Sequence[int] = (2,), sigma_data: float = 1.0,
                 min_snr_gamma: float = 5.0, t_eps: float = 1e-3, t_max: float | None = None,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 null_label: int | None = None, class_dropout: float = 0.0,
                 x0_limit: X0Limit | dict[str, Any] | None = None):
        super().__init__(net, path, prediction, sample_shape, num_classes=num_classes, class_names=class_names,
                         null_label=null_label, class_dropout=class_dropout)
        if prediction == "score":
            raise ConfigError("Diffusion trains eps, x0, v or velocity predictions; a score network is an eps "
                              "network scaled by -1/sigma, so use prediction='eps'")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if sigma_data <= 0 or min_snr_gamma <= 0:
            raise ConfigError(f"sigma_data and min_snr_gamma must be positive; got {sigma_data}, {min_snr_gamma}")
        if t_max is None:
            t_max = float(self.path.t_from_log_snr(-5.0)) if (self.path.alpha_vanishes and prediction == "eps") else 1.0
        if not 0 <= t_eps < t_max <= 1:
            raise ConfigError(f"need 0 <= t_eps < t_max <= 1; got t_eps={t_eps}, t_max={t_max}")
        self.weighting, self.sigma_data, self.min_snr_gamma = weighting, float(sigma_data), float(min_snr_gamma)
        self.t_eps, self.t_max = float(t_eps), float(t_max)
        if isinstance(x0_limit, dict):
            x0_limit = X0Limit(**x0_limit)
        if x0_limit is not None and not isinstance(x0_limit, X0Limit):
            raise ConfigError(f"x0_limit must be a genkit.paths.X0Limit, a dict of its options or None; got "
                              f"{x0_limit!r}")
        self.x0_limit = x0_limit

    def net_input(self, x: Tensor, t: Tensor) -> Tensor:
        if self.path.variance_preserving and self.sigma_data == 1.0:
            return x  # c_in = 1 / sqrt(alpha^2 + sigma^2) = 1
        a, s, _, _ = self.path.coefficients(t, x)
        return x * torch.rsqrt(a * a * self.sigma_data ** 2 + s * s)

    denoise_end = True

    #: Default (solver, grid) of a ddpm-path eps model, chosen by measurement (eval/bench_diffusers_sampling.py:
    #: a digits UNet in diffusers' default DDPM configuration, 500 samples from the same noise, digits Frechet
    #: distance, noise floor 56): DPM-Solver++(2M) on diffusers' ``leading`` timesteps scored 244 / 144 / 126 at
    #: 5 / 10 / 20 NFE against diffusers' default DDIMScheduler 262 / 165 / 139 and DPMSolverMultistepScheduler
    #: 288 / 166 / 152; ddim on leading 268 / 195 / 172, dpmpp_2m on trailing 311 / 185 / 153, on the model's
    #: uniform range 381 / 169 / 138, on log-SNR 376 / 150 / 150. x0 clipping (``x0_limit``; diffusers' DDIM
    #: clips by default) helps further (dpmpp_2m + leading + clip: 232 / 119 / 90) but assumes data in [-1, 1],
    #: so it stays opt-in.
    DDPM_EPS_DEFAULT: ClassVar[tuple[str, str]] = ("dpmpp_2m", "leading")

    def _ddpm_eps(self) -> bool:
        """diffusers' DDPM configuration: ddpm path, eps, trained up to t = 1 (diffusers' spacings start near 1;
        a model trained only up to a smaller t_max keeps the uniform grid over its own range)."""
        return self.path.name == "ddpm" and self.prediction == "eps" and self.t_max >= 1.0

    def default_sampler(self) -> Sampler:
        """heun on the uniform grid (32 steps); a ddpm-path eps model trained up to t = 1 (diffusers' DDPM
        configuration) uses
        :attr:`DDPM_EPS_DEFAULT`, one evaluation per step, so ``model.sample(n, steps=k)`` costs k evaluations
        (see that attribute for the measurement)."""
        if self._ddpm_eps():
            return ODESampler(*self.DDPM_EPS_DEFAULT[:1], None, self.DDPM_EPS_DEFAULT[1])
        return super().default_sampler()

    def get_sampler(self, sampler: str | Sampler | None = None, *, solver: Any = None, steps: int | None = None,
                    grid: str | TimeGrid | Tensor | Sequence[float] | None = None) -> Sampler:
        """As :meth:`ContinuousModel.get_sampler`; a ddpm-path eps model given a solver but no grid uses its
        measured default grid (:attr:`DDPM_EPS_DEFAULT`) instead of the uniform one."""
        if self._ddpm_eps() and sampler is None and solver is not None and grid is None:
            grid = self.DDPM_EPS_DEFAULT[1]
        return super().get_sampler(sampler, solver=solver, steps=steps, grid=grid)

    def default_grid(self, grid):
        """A grid given by name runs over the training range ``[t_eps, t_max]``: below ``t_eps`` the network
        was never trained and the velocity of eps/x0 networks grows like ``1/sigma``. Sampling then returns
        ``E[x_0 | x_{t_eps}]`` (the final denoising step of Song et al. 2021 and DDIM's last step)."""
        if isinstance(grid, str) and grid in ("leading", "trailing", "linspace"):
            return get_grid(grid)  # diffusers' timesteps (t >= 1 / N), then the final denoising step
        if isinstance(grid, str):
            t_min, t_max = self.time_range()
            return get_grid(grid, t_max=t_max, t_min=t_min)
        return grid

    def time_range(self) -> tuple[float, float]:
        return max(self.t_eps, self.path.t_min), self.t_max

    def check_grid(self, times: Tensor) -> None:
        """An explicit grid (a grid object or times) must stay in the training range: a time strictly between 0
        and ``t_eps`` would evaluate the network where it was never trained, so it is a TimeGridError. A last
        time of exactly 0 is allowed: sampling runs it as the final denoising step ``E[x_0 | x_t]`` at the time
        before it (a solver given such a grid directly steps to t = 0 from there)."""
        t_lo = max(self.t_eps, self.path.t_min) * (1 - 1e-9)
        values = times.tolist() if torch.is_tensor(times) else [float(v) for v in times]  # a few floats: cheap
        inner = values[:-1] if values[-1] == 0 else values
        bad = [v for v in inner if 0 <= v < t_lo]
        if bad:
            raise TimeGridError(
                f"the grid goes to t={min(bad):.3g}, below this model's training range: it was trained on "
                f"t >= t_eps={self.t_eps:g}, so the network would be extrapolated. End the grid at t_eps (e.g. "
                f"Uniform(t_min={t_lo:g}), Karras(t_min={t_lo:g}); the model then returns E[x_0 | x_t_eps]), end it "
                f"at 0 from a time >= t_eps (the last step is then the final denoising step), or give a grid by "
                f"name, which runs over the training range")

    def weight(self, t: Tensor, x: Tensor) -> Tensor:
        """Per-sample loss weight in the network's parametrization, broadcastable to x."""
        if self.weighting == "uniform":
            return torch.ones_like(t).reshape((-1,) + (1,) * (x.ndim - 1))
        a, s, da, ds = self.path.coefficients(t, x)
        snr = (a / s) ** 2
        if self.weighting == "min_snr":
            w_x0 = torch.clamp(snr, max=self.min_snr_gamma)
        else:
            sig2 = 1 / snr
            w_x0 = (sig2 + self.sigma_data ** 2) / (sig2 * self.sigma_data ** 2)
        k2 = {"x0": torch.ones_like(snr), "eps": snr, "v": (a * a + s * s) ** 2 / (s * s),
              "velocity": (a * ds - s * da) ** 2 / (s * s)}[self.prediction]
        return w_x0 / k2

    def loss(self, batch: Tensor | tuple[Tensor, Tensor],
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Weighted denoising loss averaged over the batch; ``generator`` draws t and the noise (then, for a
        class-conditional model, its class dropout). ``batch`` is ``x [B, ...]``, or ``(x, labels [B])`` for a
        class-conditional model."""
        x0, labels = self.split_batch(batch)
        check_generator(generator, f"{self.family}.loss")
        u = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.t_eps + (self.t_max - self.t_eps) * u
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt = self.path.sample(x0, t, eps)
        target = self.path.from_x0_eps(x0, eps, xt, t, self.prediction)
        cond = {} if labels is None else {"labels": self.drop_labels(labels, generator)}
        err = (self(xt, t, **cond) - target).pow(2)
        loss = (self.weight(t, x0) * err).flatten(1).mean(1).mean()
        return loss, {}

    def extra_config(self) -> dict[str, Any]:
        return {"weighting": self.weighting, "sigma_data": self.sigma_data, "min_snr_gamma": self.min_snr_gamma,
                "t_eps": self.t_eps, "t_max": self.t_max,
                "x0_limit": None if self.x0_limit is None else self.x0_limit.config()}

    @classmethod
    def example(cls) -> tuple[Diffusion, Tensor]:
        """A 2-D v-prediction model on the cosine path (MLP 16 x 1, seeded) and 32 points of a Gaussian."""
        from ..nets import MLP

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = cls(MLP(2, hidden=16, depth=1, time_dim=8), "cosine", "v", "min_snr", sample_shape=(2,))
        g = torch.Generator().manual_seed(0)
        return model, 0.5 * torch.randn(32, 2, generator=g) - 0.5

    cli_defaults: ClassVar[dict[str, Any]] = {"path": "cosine", "prediction": "v", "weighting": "uniform"}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--prediction", help="what the network predicts, eps, x0, v or velocity (default: v, "
                                                "which stays accurate near t = 1, where eps predictions on the "
                                                "cosine path are amplified ~1/alpha)")
        group.add_argument("--weighting", help=f"loss weighting, one of {', '.join(WEIGHTINGS)} (default: uniform)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: nn.Module, sample_shape: Sequence[int]) -> Diffusion:
        return cls(net, args.path, args.prediction, args.weighting, sample_shape=sample_shape,
                   **cls.class_options(args))

    @classmethod
    def net_options(cls, args: argparse.Namespace, kind: str) -> dict[str, Any]:
        """On the ddpm path a UNet gets diffusers' time map (step i = N t - 1), so the model exports exactly
        (:func:`genkit.to_diffusers`)."""
        if kind == "unet" and args.path == "ddpm":
            return {"time_scale": float(get_path("ddpm").num_steps), "time_shift": -1.0}
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Diffusion:
        from ..nets import build as build_net

        c = dict(config)
        return cls(build_net(c["net"]), path_from_config(c["path"]), c["prediction"], c["weighting"],
                   sample_shape=c["sample_shape"], sigma_data=c["sigma_data"], min_snr_gamma=c["min_snr_gamma"],
                   t_eps=c["t_eps"], t_max=c["t_max"], x0_limit=c.get("x0_limit"), **cls.class_config(c))
