"""Probability paths ``x_t = alpha(t) x_0 + sigma(t) eps`` and every parametrization conversion.

Time runs over ``t in [0, 1]``: ``t = 0`` is data, ``t = 1`` is noise. A path knows ``alpha``, ``sigma``,
their time derivatives, the log signal-to-noise ratio ``lambda(t) = 2 log(alpha / sigma)`` and its
inverse, and converts a network output between the five parametrizations

- ``eps``: the noise ``eps``;
- ``x0``: the clean data ``x_0``;
- ``velocity``: ``dx_t/dt = alpha' x_0 + sigma' eps`` (flow matching's target);
- ``v``: Salimans & Ho's ``v = alpha eps - sigma x_0`` (diffusers' ``v_prediction``);
- ``score``: ``grad log p_t(x) = -eps / sigma``.

Conversions live here and nowhere else. Schedules are computed in float64 and cast to the input dtype.

>>> import torch
>>> p = get_path("linear")
>>> x0, eps, t = torch.randn(4, 2), torch.randn(4, 2), torch.full((4,), 0.3)
>>> xt = p.sample(x0, t, eps)
>>> v = p.convert(eps, xt, t, "eps", "velocity")
>>> torch.allclose(v, eps - x0, atol=1e-5)
True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, ShapeError
from .registry import Registry

__all__ = [
    "PREDICTIONS",
    "Path",
    "LinearPath",
    "CosinePath",
    "DDPMLinearPath",
    "VEPath",
    "PATHS",
    "get_path",
    "path_from_config",
    "broadcast_time",
    "X0Limit",
]

PREDICTIONS = ("eps", "x0", "velocity", "v", "score")
PATHS: Registry = Registry("path")


def broadcast_time(t: Tensor | float, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Return ``t`` as a tensor of shape ``[batch]`` on ``x``'s device, in ``x``'s dtype when ``x`` is floating
    point.

    A Python float or a 0-d tensor is broadcast; a ``[batch]`` tensor is checked. Integer times
    (diffusers-style timesteps) and times on another device are rejected, never silently converted.
    The time's dtype comes from a float reference, never from an integer ``x`` (token tensors): ``dtype`` when
    given, else ``x``'s dtype for floating-point ``x``, else a float tensor ``t``'s own dtype, else
    ``torch.get_default_dtype()``.

    >>> broadcast_time(0.5, torch.zeros(3, 2))
    tensor([0.5000, 0.5000, 0.5000])
    >>> broadcast_time(0.7, torch.zeros(2, 4, dtype=torch.long))
    tensor([0.7000, 0.7000])
    """
    if dtype is None:
        if x.is_floating_point():
            dtype = x.dtype
        else:
            dtype = t.dtype if torch.is_tensor(t) and t.is_floating_point() else torch.get_default_dtype()
    elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ShapeError(f"broadcast_time: dtype={dtype!r} is not a floating-point dtype; pass e.g. torch.float32")
    if not torch.is_tensor(t):
        return torch.full((x.shape[0],), float(t), device=x.device, dtype=dtype)
    if not t.is_floating_point():
        raise ShapeError(
            f"t must be a float tensor in [0, 1]; got dtype {t.dtype}. genkit time runs over [0, 1] (t=0 data, "
            "t=1 noise): divide integer timesteps by the number of training steps."
        )
    if t.device != x.device:
        raise ShapeError(f"t is on {t.device} but x is on {x.device}; move t with t.to(x.device)")
    if t.ndim == 0:
        return (t if t.dtype == dtype else t.to(dtype)).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ShapeError(
            f"t must be a float or a tensor of shape [batch]=[{x.shape[0]}]; got shape {tuple(t.shape)}. "
            "Pass one time per sample, e.g. torch.full((x.shape[0],), t)."
        )
    return t if t.dtype == dtype else t.to(dtype)


class X0Limit:
    """Limits on the data prediction ``x0`` applied while sampling, diffusers' names and semantics:

    - ``clip_sample=True``: clamp ``x0`` to ``[-clip_sample_range, clip_sample_range]`` (DDPM/DDIM's
      ``clip_sample``);
    - ``thresholding=True``: Imagen's dynamic thresholding (Saharia et al. 2022, arXiv 2205.11487, sec. 2.3):
      per sample, ``s = clamp(quantile(|x0|, dynamic_thresholding_ratio), 1, sample_max_value)`` over all
      non-batch entries, then ``x0 = clamp(x0, -s, s) / s``. It takes precedence over ``clip_sample``, as in
      diffusers' schedulers.

    The limit acts on ``x0`` only; the solvers then read the limited ``x0`` through the path, so the implied
    noise is ``eps = (x_t - alpha x0) / sigma`` (diffusers re-derives ``pred_epsilon`` the same way).
    :class:`genkit.fields.LimitedX0` applies it to any field; a :class:`genkit.Diffusion` model with one
    samples through it with every solver.

    >>> X0Limit(clip_sample=True)(torch.tensor([[-3.0, 0.5, 2.0]])).tolist()
    [[-1.0, 0.5, 1.0]]
    """

    def __init__(self, clip_sample: bool = False, clip_sample_range: float = 1.0, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0):
        if not clip_sample_range > 0:
            raise ConfigError(f"clip_sample_range must be positive; got {clip_sample_range}")
        if not 0 < dynamic_thresholding_ratio <= 1:
            raise ConfigError(f"dynamic_thresholding_ratio is a quantile in (0, 1]; got {dynamic_thresholding_ratio} "
                              "(Imagen and diffusers use 0.995)")
        if not sample_max_value >= 1:
            raise ConfigError(f"sample_max_value must be >= 1 (the threshold is clamped to [1, sample_max_value]); "
                              f"got {sample_max_value}")
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)
        self.thresholding, self.dynamic_thresholding_ratio = bool(thresholding), float(dynamic_thresholding_ratio)
        self.sample_max_value = float(sample_max_value)

    @property
    def active(self) -> bool:
        return self.clip_sample or self.thresholding

    def __call__(self, x0: Tensor) -> Tensor:
        if self.thresholding:
            flat = x0.reshape(x0.shape[0], -1)
            work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            s = torch.quantile(work.abs(), self.dynamic_thresholding_ratio, dim=1)
            s = torch.clamp(s, min=1.0, max=self.sample_max_value).unsqueeze(1)
            return (torch.clamp(work, -s, s) / s).to(x0.dtype).reshape(x0.shape)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def config(self) -> dict[str, Any]:
        return {"clip_sample": self.clip_sample, "clip_sample_range": self.clip_sample_range,
                "thresholding": self.thresholding, "dynamic_thresholding_ratio": self.dynamic_thresholding_ratio,
                "sample_max_value": self.sample_max_value}

    def __repr__(self) -> str:
        if self.thresholding:
            return (f"X0Limit(thresholding=True, dynamic_thresholding_ratio={self.dynamic_thresholding_ratio}, "
                    f"sample_max_value={self.sample_max_value})")
        return f"X0Limit(clip_sample={self.clip_sample}, clip_sample_range={self.clip_sample_range})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X0Limit) and self.config() == other.config()


def _check_prediction(name: str) -> None:
    if name not in PREDICTIONS:
        raise ConfigError(f"unknown prediction {name!r}; choose one of {PREDICTIONS}")


class Path:
    """An affine path ``x_t = alpha(t) x_0 + sigma(t) eps``. Subclasses give the four schedule functions
    in float64 (``_alpha``, ``_sigma``, ``_d_alpha``, ``_d_sigma``) and a ``config``."""

    name: str = "path"
    #: True when alpha(1) == 0, so eps/score predictions carry no information about x_0 at t = 1.
    alpha_vanishes: bool = False
    #: Smallest time where the velocity is finite; default end of sampling grids and start of likelihoods.
    t_min: float = 0.0
    #: True when alpha^2 + sigma^2 = 1 at every t.
    variance_preserving: bool = False

    # --- schedule in float64; subclasses override -------------------------------------------------
    def _alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Path) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))

    # --- public schedule: same dtype/device as t ------------------------------------------------------
    def _eval(self, fn, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        return fn(t.to(torch.float64)).to(dtype)

    def alpha(self, t: Tensor | float) -> Tensor:
        return self._eval(self._alpha, t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return self._eval(self._sigma, t)

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return self._eval(self._d_alpha, t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return self._eval(self._d_sigma, t)

    def log_snr(self, t: Tensor | float) -> Tensor:
        """``lambda(t) = 2 log(alpha / sigma)``, decreasing in t; +inf at t = 0."""
        return self._eval(lambda s: 2 * (torch.log(self._alpha(s)) - torch.log(self._sigma(s))), t)

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        """Inverse of :meth:`log_snr` (bisection in float64 unless a subclass has a closed form)."""
        lam = torch.as_tensor(lam)
        dtype = lam.dtype if lam.is_floating_point() else torch.get_default_dtype()
        lam64 = lam.to(torch.float64)
        lo, hi = torch.zeros_like(lam64), torch.ones_like(lam64)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = 2 * (torch.log(self._alpha(mid)) - torch.log(self._sigma(mid))) > lam64
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(dtype)

    def ve_sigma(self, t: Tensor | float) -> Tensor:
        """Noise level of the equivalent variance-exploding process, ``sigma / alpha = exp(-lambda / 2)``
        (EDM's and k-diffusion's sigma): 0 at t = 0, infinite where alpha = 0."""
        return torch.exp(-self.log_snr(t) / 2)

    def t_from_ve_sigma(self, ve_sigma: Tensor | float) -> Tensor:
        """Inverse of :meth:`ve_sigma` (``ve_sigma = 0`` gives t = 0)."""
        s = torch.as_tensor(ve_sigma)
        dtype = s.dtype if s.is_floating_point() else torch.get_default_dtype()
        s64 = s.to(torch.float64)
        t = self.t_from_log_snr(torch.where(s64 > 0, -2 * torch.log(s64), torch.zeros_like(s64)))
        return torch.where(s64 > 0, t.to(torch.float64), torch.zeros_like(s64)).to(dtype)

    def g2(self, t: Tensor | float) -> Tensor:
        """Squared diffusion coefficient of the forward SDE with these marginals:
        ``g^2 = 2 sigma (alpha sigma' - sigma alpha') / alpha`` (infinite where alpha = 0)."""
        return self._eval(
            lambda s: 2 * self._sigma(s) * (self._alpha(s) * self._d_sigma(s) - self._sigma(s) * self._d_alpha(s))
            / self._alpha(s),
            t,
        )

    def prior_std(self) -> float:
        """Standard deviation of the Gaussian the sampler starts from at t = 1."""
        return float(self._sigma(torch.tensor(1.0, dtype=torch.float64)))

    def sample_prior(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Draw ``x_1 ~ N(0, sigma(1)^2 I)`` (alpha(1) x_0 is neglected where alpha(1) is tiny but not 0).

        A ``generator`` on another device than ``device`` (a CPU generator for CUDA samples, say) draws on its
        own device and the noise is moved, so one CPU seed gives the same noise on every device.
        """
        on = generator.device if generator is not None else device
        z = torch.randn(shape, generator=generator, device=on, dtype=dtype)
        if device is not None and z.device != torch.device(device):
            z = z.to(device)
        return z * self.prior_std()

    # --- path samples and conversions ------------------------------------------------------------------
    def _coefficients64(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha, sigma, alpha', sigma')`` of a float64 tensor, in one pass (paths may share work)."""
        return self._alpha(t), self._sigma(t), self._d_alpha(t), self._d_sigma(t)

    def coefficients(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha, sigma, alpha', sigma')`` at ``t``, shaped to broadcast against ``x``, in x's dtype."""
        t = broadcast_time(t, x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        if t.ndim == 1 and t.shape[0] > 1 and t.stride(0) == 0:  # one time for the batch (solvers): once
            full = (t.shape[0],) + shape[1:]
            coefficients = self._coefficients64(t[:1].to(torch.float64))
            return tuple(v.to(t.dtype).reshape(shape).expand(full) for v in coefficients)
        return tuple(v.to(t.dtype).reshape(shape) for v in self._coefficients64(t.to(torch.float64)))

    def sample(self, x0: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
        """``x_t = alpha(t) x_0 + sigma(t) eps``."""
        if x0.shape != eps.shape:
            raise ShapeError(f"x0 and eps must have one shape; got {tuple(x0.shape)} and {tuple(eps.shape)}")
        a, s, _, _ = self.coefficients(t, x0)
        return a * x0 + s * eps

    def to_x0_eps(self, out: Tensor, x: Tensor, t: Tensor | float, prediction: str) -> tuple[Tensor, Tensor]:
        """Recover ``(x0_hat, eps_hat)`` from a network output ``out`` of kind ``prediction`` at ``(x, t)``.

        Where sigma(t) = 0 (the data end) the noise cannot be read off an x0 prediction; there its
        posterior mean, 0, is returned, which is also the limit for any data with a density.
        """
        _check_prediction(prediction)
        if out.shape != x.shape:
            raise ShapeError(f"prediction shape {tuple(out.shape)} differs from x shape {tuple(x.shape)}")
        p1, p2, q1, q2 = _reading(*self.coefficients(t, x), prediction)
        return p1 * x + p2 * out, q1 * x + q2 * out

    def from_x0_eps(self, x0: Tensor, eps: Tensor, x: Tensor, t: Tensor | float, prediction: str) -> Tensor:
        """Express the pair ``(x0, eps)`` at ``(x, t)`` as a prediction of kind ``prediction``."""
        _check_prediction(prediction)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        r1, r2 = _writing(*self.coefficients(t, x), prediction)
        return r1 * x0 + r2 * eps

    def convert(self, out: Tensor, x: Tensor, t: Tensor | float, src: str, dst: str) -> Tensor:
        """Convert a network output from parametrization ``src`` to ``dst`` (see module docstring)."""
        _check_prediction(dst)
        if src == dst:
            _check_prediction(src)
            return out
        x0, eps = self.to_x0_eps(out, x, t, src)
        return self.from_x0_eps(x0, eps, x, t, dst)

    def conversion_coefficients(self, t: Tensor, src: str, dst: str) -> tuple[Tensor, Tensor]:
        """``(cx, cout)`` with ``convert(out, x, t, src, dst) == cx * x + cout * out``: every conversion is
        affine in ``(x, out)`` with coefficients depending on t only. ``t`` is any float tensor; the result
        is float64 of its shape. Solvers precompute these once per solve."""
        _check_prediction(src)
        _check_prediction(dst)
        t64 = torch.as_tensor(t).to(torch.float64)
        if src == dst:
            return torch.zeros_like(t64), torch.ones_like(t64)
        abar = self._coefficients64(t64)
        p1, p2, q1, q2 = _reading(*abar, src)
        r1, r2 = _writing(*abar, dst)
        return r1 * p1 + r2 * q1, r1 * p2 + r2 * q2


def _reading(a: Tensor, s: Tensor, da: Tensor, ds: Tensor, src: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x0 = p1 x + p2 out`` and ``eps = q1 x + q2 out`` for an output of kind ``src`` (x = a x0 + s eps)."""
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if src == "eps":
        return 1 / a, -s / a, zero, one
    if src == "score":  # eps = -s score
        return 1 / a, s * s / a, zero, -s
    if src == "x0":  # eps = (x - a x0) / s, and 0 (its posterior mean) where s = 0
        inv = torch.where(s > 0, 1 / torch.where(s > 0, s, one), zero)
        return zero, one, inv, -a * inv
    if src == "velocity":  # velocity = a' x0 + s' eps
        det = a * ds - s * da
        return ds / det, -s / det, -da / det, a / det
    norm = a * a + s * s  # Salimans' v = a eps - s x0
    return a / norm, -s / norm, s / norm, a / norm


def _writing(a: Tensor, s: Tensor, da: Tensor, ds: Tensor, dst: str) -> tuple[Tensor, Tensor]:
    """``out = r1 x0 + r2 eps`` for an output of kind ``dst``."""
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return {"eps": lambda: (zero, one), "x0": lambda: (one, zero), "velocity": lambda: (da, ds),
            "v": lambda: (-s, a), "score": lambda: (zero, -1 / s)}[dst]()


@PATHS.register("linear")
class LinearPath(Path):
    """Rectified flow / conditional OT: ``alpha = 1 - t``, ``sigma = t``."""

    name = "linear"
    alpha_vanishes = True

    def _alpha(self, t):
        return 1 - t

    def _sigma(self, t):
        return t

    def _d_alpha(self, t):
        return -torch.ones_like(t)

    def _d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam)
        return torch.sigmoid(-lam.to(torch.float64) / 2).to(lam.dtype if lam.is_floating_point() else torch.float32)


@PATHS.register("cosine")
class CosinePath(Path):
    """Variance-preserving cosine schedule (Nichol & Dhariwal 2021, arXiv 2102.09672):
    ``alpha = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s))``, ``sigma = sqrt(1 - alpha^2)``.
    ``offset = 0`` (default) gives the trigonometric path ``alpha = cos(pi t/2)``, ``sigma = sin(pi t/2)``."""

    name = "cosine"
    alpha_vanishes = True
    variance_preserving = True

    def __init__(self, offset: float = 0.0):
        if not 0.0 <= offset < 1.0:
            raise ConfigError(f"cosine offset must be in [0, 1); got {offset}. The usual value is 0.008.")
        self.offset = float(offset)

    def config(self):
        return {"name": self.name, "offset": self.offset}

    def _angle(self, t):
        return (t + self.offset) / (1 + self.offset) * (math.pi / 2)

    def _alpha(self, t):
        # cos(angle) written as sin(pi/2 - angle) so that alpha(1) is exactly 0, not 6e-17
        s = self.offset
        return torch.sin((1 - t) / (1 + s) * (math.pi / 2)) / math.cos(s / (1 + s) * math.pi / 2)

    def _sigma(self, t):
        return torch.sqrt(torch.clamp(1 - self._alpha(t) ** 2, min=0.0))

    def _d_alpha(self, t):
        k = (math.pi / 2) / (1 + self.offset)
        return -k * torch.sin(self._angle(t)) / math.cos(self.offset / (1 + self.offset) * math.pi / 2)

    def _d_sigma(self, t):
        # d/dt sqrt(1 - alpha^2) = -alpha alpha' / sigma; at t = 0 with offset 0 it is pi/2.
        s = self._sigma(t)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return torch.where(s > 0, -self._alpha(t) * self._d_alpha(t) / safe, torch.full_like(t, math.pi / 2))


@PATHS.register("ddpm")
class DDPMLinearPath(Path):
    """Variance preserving with DDPM's linear betas (Ho et al. 2020, arXiv 2006.11239).

    ``alpha^2`` equals diffusers' ``DDPMScheduler(beta_schedule="linear").alphas_cumprod[i]`` at
    ``t = (i + 1) / N`` exactly: with ``beta_j = b0 + d j`` the product ``prod_{j<=u} (1 - beta_j)`` is
    ``d^(u+1) Gamma(c + 1) / Gamma(c - u)`` with ``c = (1 - b0) / d``, a smooth function of ``u = N t - 1``.
    ``t = 0`` gives ``alpha = 1``. Integer step ``i`` of a diffusers model is ``t = (i + 1) / N``.
    """

    name = "ddpm"
    # sigma ~ sqrt(beta_start N t) near 0, so sigma' diverges at t = 0: stop grids just above it.
    t_min = 1e-5
    variance_preserving = True

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000):
        if not (0 < beta_start < beta_end < 1) or num_steps < 2:
            raise ConfigError(
                f"ddpm path needs 0 < beta_start < beta_end < 1 and num_steps >= 2; got "
                f"beta_start={beta_start}, beta_end={beta_end}, num_steps={num_steps}"
            )
        self.beta_start, self.beta_end, self.num_steps = float(beta_start), float(beta_end), int(num_steps)
        self._d = (self.beta_end - self.beta_start) / (self.num_steps - 1)
        self._c = (1 - self.beta_start) / self._d
        self._lgamma_c1 = float(torch.lgamma(torch.tensor(self._c + 1, dtype=torch.float64)))

    def config(self):
        return {"name": self.name, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "num_steps": self.num_steps}

    def _log_abar(self, t):
        u = self.num_steps * t - 1
        return (u + 1) * math.log(self._d) + self._lgamma_c1 - torch.lgamma(self._c - u)

    def _d_log_abar(self, t):
        u = self.num_steps * t - 1
        return self.num_steps * (math.log(self._d) + torch.digamma(self._c - u))

    def _alpha(self, t):
        return torch.exp(0.5 * self._log_abar(t))

    def _sigma(self, t):
        return torch.sqrt(-torch.expm1(self._log_abar(t)))

    def _d_alpha(self, t):
        return 0.5 * self._d_log_abar(t) * self._alpha(t)

    def _d_sigma(self, t):
        # d sigma/dt = -abar' / (2 sigma) = -abar dlog(abar)/dt / (2 sigma); diverges like t^-1/2 at t = 0.
        abar = torch.exp(self._log_abar(t))
        s = self._sigma(t)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return torch.where(s > 0, -abar * self._d_log_abar(t) / (2 * safe), torch.full_like(t, math.inf))

    def _coefficients64(self, t):
        la, dla = self._log_abar(t), self._d_log_abar(t)
        alpha, sigma = torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        d_sigma = torch.where(sigma > 0, -torch.exp(la) * dla / (2 * safe), torch.full_like(t, math.inf))
        return alpha, sigma, 0.5 * dla * alpha, d_sigma

    def timestep(self, t: Tensor) -> Tensor:
        """genkit time -> diffusers' (continuous) integer timestep index ``N t - 1``."""
        return self.num_steps * t - 1


@PATHS.register("ve")
class VEPath(Path):
    """Variance exploding, EDM's choice ``sigma(t) = t`` rescaled to ``[0, 1]`` (Karras et al. 2022,
    arXiv 2206.00364): ``alpha = 1``, ``sigma = sigma_max t``."""

    name = "ve"

    def __init__(self, sigma_max: float = 80.0):
        if not sigma_max > 0:
            raise ConfigError(f"ve sigma_max must be positive; got {sigma_max}. EDM uses 80.")
        self.sigma_max = float(sigma_max)

    def config(self):
        return {"name": self.name, "sigma_max": self.sigma_max}

    def _alpha(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return self.sigma_max * t

    def _d_alpha(self, t):
        return torch.zeros_like(t)

    def _d_sigma(self, t):
        return torch.full_like(t, self.sigma_max)

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam)
        return (torch.exp(-lam.to(torch.float64) / 2) / self.sigma_max).to(
            lam.dtype if lam.is_floating_point() else torch.float32)


def get_path(name: str | Path, **kwargs: Any) -> Path:
    """A path by name (``linear``, ``cosine``, ``ddpm``, ``ve``) with its options, or a Path unchanged."""
    if isinstance(name, Path):
        if kwargs:
            raise ConfigError(f"options {sorted(kwargs)} given with an already built path {name!r}")
        return name
    cls = PATHS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad options for path {name!r}: {e}") from None


def path_from_config(config: dict[str, Any]) -> Path:
    """Inverse of :meth:`Path.config`."""
    config = dict(config)
    return get_path(config.pop("name"), **config)
