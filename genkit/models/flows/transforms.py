"""Invertible transforms for normalizing flows, each with an exact log-determinant.

Convention: ``forward`` maps data ``x`` towards the base (the density direction), ``inverse`` maps back (the
sampling direction). Both take ``[batch, features]`` and an optional context ``[batch, context_features]`` and
return ``(output, logdet[batch])``, where ``logdet`` is ``log |det d output / d input|`` of the map applied.

Every transform is registered in :data:`FLOW_TRANSFORMS` with ``example() -> (transform, x, context)``, a tiny
seeded float64 instance with non-trivial weights; the property suite in tests/test_flow_transforms.py runs on
every registered name.

>>> t, x, c = FLOW_TRANSFORMS.get("coupling_spline").example()
>>> y, ld = t(x, c)
>>> x2, ld2 = t.inverse(y, c)
>>> bool((x2 - x).abs().max() < 1e-10), bool((ld + ld2).abs().max() < 1e-10)
(True, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...errors import ConfigError, ShapeError
from ...registry import Registry
from .splines import DEFAULT_MIN_DERIVATIVE, DEFAULT_MIN_HEIGHT, DEFAULT_MIN_WIDTH, _check_options, rq_spline

__all__ = ["Transform", "FLOW_TRANSFORMS", "CouplingSpline", "MaskedCouplingSpline", "AutoregressiveSpline",
           "AffineCoupling", "LULinear", "Permutation", "MaskedLinear", "half_swap_permutation"]

FLOW_TRANSFORMS: Registry = Registry("flow transform")


class Transform(nn.Module):
    """Base class: ``features``, ``context_features`` (0 for an unconditional transform) and ``domain``, the
    set the transform maps onto itself: ``"real"`` (``R^features``), ``"circle"`` (angles, ``[-pi, pi)^features``,
    a torus) or ``"interval"`` (``[0, 1]^features``)."""

    features: int
    context_features: int = 0
    domain: str = "real"

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ShapeError(f"{type(self).__name__} expects inputs [batch, {self.features}]; got "
                             f"{tuple(x.shape)}")
        if self.context_features == 0:
            return
        if context is None:
            raise ShapeError(f"{type(self).__name__} was built with context_features={self.context_features}; "
                             f"pass context=[batch, {self.context_features}]")
        if context.dim() != 2 or context.shape != (x.shape[0], self.context_features):
            raise ShapeError(f"{type(self).__name__} expects context [{x.shape[0]}, {self.context_features}] "
                             f"(one row per input); got {tuple(context.shape)}")

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} defines neither _run nor forward / inverse")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)`` towards the base (a transform may define ``_run(x, context, inverse)`` for
        both directions at once)."""
        return self._run(x, context, False)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dy|)`` back from the base."""
        return self._run(y, context, True)


def _mlp(n_in: int, n_out: int, hidden: int, layers: int) -> nn.Sequential:
    dims = [n_in] + [hidden] * layers
    mods: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    last = nn.Linear(dims[-1], n_out)
    nn.init.zeros_(last.weight)  # the transform starts at the identity (splines: with _start_at_identity)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*mods, last)


def _randomise(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _example_inputs(features: int, context_features: int, seed: int = 1) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(5, features, generator=g, dtype=torch.float64)
    c = torch.randn(5, context_features, generator=g, dtype=torch.float64) if context_features else None
    return x, c


def _check_features(name: str, features: int, least: int) -> None:
    if not (isinstance(features, int) and features >= least):
        raise ConfigError(f"{name} needs features >= {least}; got features={features!r}")


class _SplineOptions:
    bins: int
    bound: float

    def _spline_setup(self, bins: int, bound: float) -> None:
        _check_options(bins, bound, DEFAULT_MIN_WIDTH, DEFAULT_MIN_HEIGHT, DEFAULT_MIN_DERIVATIVE)
        self.bins, self.bound = bins, float(bound)

    def _start_at_identity(self, last: nn.Linear) -> None:
        """With the zeroed last layer, set the interior-derivative biases to ``softplus^-1(1 - min_derivative)``:
        every derivative is then 1 and the spline (uniform knots) the exact identity. A zero bias would start at
        derivatives 0.694, a wavy map that costs likelihood and early training steps (eval/bench_flows.py)."""
        with torch.no_grad():
            last.bias.view(-1, 3 * self.bins - 1)[:, 2 * self.bins:] = math.log(math.expm1(1 - DEFAULT_MIN_DERIVATIVE))

    def _spline(self, z: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        k = self.bins
        params = params.to(z.dtype)  # under autocast the conditioner gives bf16/fp16; the spline runs in z's dtype
        w, h, d = params[..., :k], params[..., k:2 * k], params[..., 2 * k:]
        return rq_spline(z, w, h, d, bound=self.bound, inverse=inverse)


@FLOW_TRANSFORMS.register("coupling_spline")
class CouplingSpline(Transform, _SplineOptions):
    """Coupling RQ-spline layer: one half of the features (``parity`` 0: the first ``features // 2``) passes
    unchanged and conditions, through an MLP (with the context concatenated), a spline on each of the others.

    With ``free_half=True`` (:class:`MaskedCouplingSpline`) the conditioning half is the first ``ceil(features /
    2)`` (``parity`` 1: the last) and gets a spline of its own whose parameters depend on the context alone
    (learned constants without one); the MLP still reads that half *before* its spline. This is the coupling
    layer of a MADE with two degree classes, what ``zuko.flows.NSF(passes=2)`` builds; as there (a masked layer
    reading every feature), the MLP's first layer starts at torch's default scale for ``features +
    context_features`` inputs, ``U(+-1 / sqrt(features + context_features))``, not for the half it reads. That
    smaller start trains to a better held-out NLL on wine (0.06-0.18 nats over 24 seeds), digits64 (0.2-0.6)
    and the 32-D mixture (up to 0.05) at eval/bench_flows.py's budget, and costs up to 0.02 on its 2-D sets
    (3 seeds, inside their seed spread)."""

    free_half: bool = False

    def __init__(self, features: int, context_features: int = 0, *, bins: int = 8, bound: float = 3.0,
                 hidden: int = 64, layers: int = 2, parity: int = 0):
        super().__init__()
        _check_features(type(self).__name__, features, 2)
        self._spline_setup(bins, bound)
        self.features, self.context_features, self.parity = features, context_features, parity % 2
        idx = torch.arange(features)
        n_cond = (features + 1) // 2 if self.free_half else features // 2
        cond = idx < n_cond if self.parity == 0 else idx >= features - n_cond
        self.register_buffer("cond_idx", idx[cond], persistent=False)
        self.register_buffer("trans_idx", idx[~cond], persistent=False)
        # both halves are contiguous: slices (views) instead of index gathers and scatters
        n_trans = features - n_cond
        self._cond = slice(0, n_cond) if self.parity == 0 else slice(n_trans, features)
        self._trans = slice(n_cond, features) if self.parity == 0 else slice(0, n_trans)
        self.net = _mlp(len(self.cond_idx) + context_features, len(self.trans_idx) * (3 * bins - 1), hidden, layers)
        self._start_at_identity(self.net[-1])
        if self.free_half and layers:  # rescale U(+-1/sqrt(n_in)) to U(+-1/sqrt(D + C)): the same draws
            first = self.net[0]
            with torch.no_grad():
                scale = math.sqrt(first.in_features / (features + context_features))
                first.weight.mul_(scale)
                first.bias.mul_(scale)
        if self.free_half:  # the conditioning half's own splines: an affine map of the context (a constant)
            self.free = nn.Linear(max(context_features, 1), n_cond * (3 * bins - 1))
            nn.init.zeros_(self.free.weight)
            nn.init.zeros_(self.free.bias)
            self._start_at_identity(self.free)

    def _free_params(self, x: Tensor, context: Tensor | None) -> Tensor:
        shape = (x.shape[0], len(self.cond_idx), 3 * self.bins - 1)
        if self.context_features:
            return self.free(context).view(shape)
        # free(0): the learned constants, computed once and broadcast (the weight stays on the graph, zero grad)
        return self.free(x.new_zeros(1, 1)).view(1, *shape[1:]).expand(shape)

    def _halves(self, cond: Tensor, trans: Tensor) -> Tensor:
        """Join a conditioning-half and a transformed-half tensor along dim 1, in feature order."""
        return torch.cat([cond, trans] if self.parity == 0 else [trans, cond], dim=1)

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        xc, xt = x[:, self._cond], x[:, self._trans]
        ld_c: Tensor | float = 0.0
        if self.free_half and inverse:  # undo the conditioning half's spline first: the MLP reads its input
            xc, ld_c = self._spline(xc, self._free_params(x, context), True)
        inp = xc if context is None or not self.context_features else torch.cat([xc, context], dim=1)
        params = self.net(inp).view(x.shape[0], len(self.trans_idx), 3 * self.bins - 1)
        if self.free_half and not inverse:  # one spline call over every feature: its parameters in feature order
            y, ld = self._spline(x, self._halves(self._free_params(x, context), params), False)
            return y, ld.sum(1)
        z, ld = self._spline(xt, params, inverse)
        ld = ld.sum(1)
        return self._halves(xc, z), ld + (ld_c.sum(1) if torch.is_tensor(ld_c) else ld_c)

    @classmethod
    def example(cls) -> tuple[CouplingSpline, Tensor, Tensor | None]:
        t = cls(3, 2, bins=5, bound=2.5, hidden=8, layers=2).double()
        _randomise(t, 0)
        return (t, *_example_inputs(3, 2))


@FLOW_TRANSFORMS.register("masked_coupling_spline")
class MaskedCouplingSpline(CouplingSpline):
    """:class:`CouplingSpline` with ``free_half=True``: both halves get splines, the conditioning half's from
    the context alone (zuko's ``NSF(passes=2)`` layer; see there)."""

    free_half = True

    @classmethod
    def example(cls) -> tuple[CouplingSpline, Tensor, Tensor | None]:
        t = cls(5, 2, bins=5, bound=2.5, hidden=8, layers=2, parity=1).double()  # odd: ceil(5 / 2) = 3 condition
        _randomise(t, 0)
        return (t, *_example_inputs(5, 2))


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, arXiv:1502.03509)."""

    def __init__(self, n_in: int, n_out: int, mask: Tensor):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class _MADE(nn.Module):
    """Outputs ``[batch, features, per_feature]`` where block ``i`` depends only on inputs ``< i`` (and on the
    context, which reaches every hidden unit)."""

    def __init__(self, features: int, context_features: int, per_feature: int, hidden: int, layers: int):
        super().__init__()
        self.features, self.per = features, per_feature
        d_in = torch.arange(1, features + 1)
        d_hid = torch.arange(hidden) % max(features - 1, 1) + min(1, features - 1)
        d_out = torch.arange(features).repeat_interleave(per_feature) + 1
        blocks: list[nn.Module] = []
        prev = d_in
        for _ in range(layers):
            blocks.append(MaskedLinear(len(prev), hidden, (d_hid[:, None] >= prev[None, :]).float()))
            prev = d_hid
        self.hidden = nn.ModuleList(blocks)
        self.context = nn.Linear(context_features, hidden) if context_features else None
        self.out = MaskedLinear(len(prev), features * per_feature, (d_out[:, None] > prev[None, :]).float())
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _hidden(self, x: Tensor, context: Tensor | None) -> Tensor:
        h = x
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if i == 0 and self.context is not None:
                h = h + self.context(context)
            h = torch.relu(h)
        return h

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        return self.out(self._hidden(x, context)).view(x.shape[0], self.features, self.per)

    def block(self, x: Tensor, context: Tensor | None, i: int) -> Tensor:
        """Feature ``i``'s parameters ``[batch, 1, per_feature]`` alone (the same numbers as ``forward(x)[:, i:i
        + 1]``): the output layer's rows of block ``i`` only, what a sequential inverse needs per pass."""
        rows = slice(i * self.per, (i + 1) * self.per)
        out = self.out
        h = nn.functional.linear(self._hidden(x, context), out.weight[rows] * out.mask[rows], out.bias[rows])
        return h.view(x.shape[0], 1, self.per)


@FLOW_TRANSFORMS.register("autoregressive_spline")
class AutoregressiveSpline(Transform, _SplineOptions):
    """Autoregressive RQ-spline layer (masked autoregressive flow with spline elements): feature ``i`` goes
    through a spline whose parameters depend on features ``< i``. ``forward`` (density) is one pass;
    ``inverse`` (sampling) is sequential, ``features`` passes of the MADE (each evaluating feature ``i``'s
    output block and spline only)."""

    def __init__(self, features: int, context_features: int = 0, *, bins: int = 8, bound: float = 3.0,
                 hidden: int = 64, layers: int = 2):
        super().__init__()
        _check_features("AutoregressiveSpline", features, 1)
        if layers < 1:
            raise ConfigError(f"AutoregressiveSpline needs layers >= 1 hidden layer; got layers={layers}")
        self._spline_setup(bins, bound)
        self.features, self.context_features = features, context_features
        self.made = _MADE(features, context_features, 3 * bins - 1, hidden, layers)
        self._start_at_identity(self.made.out)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        y, ld = self._spline(x, self.made(x, context), False)
        return y, ld.sum(1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y, context)
        # pass i fixes feature i, whose parameters depend on the features < i only (already final): its spline
        # and log-determinant are computed there, for that one feature
        x = torch.zeros_like(y)
        lds = []
        for i in range(self.features):
            xi, ld = self._spline(y[:, i:i + 1], self.made.block(x, context, i), True)
            x = torch.cat([x[:, :i], xi, x[:, i + 1:]], dim=1)
            lds.append(ld)
        return x, torch.cat(lds, dim=1).sum(1)

    @classmethod
    def example(cls) -> tuple[AutoregressiveSpline, Tensor, Tensor | None]:
        t = cls(3, 2, bins=5, bound=2.5, hidden=12, layers=2).double()
        _randomise(t, 0)
        return (t, *_example_inputs(3, 2))


@FLOW_TRANSFORMS.register("affine_coupling")
class AffineCoupling(Transform):
    """RealNVP affine coupling (arXiv:1605.08803): ``y = x * exp(s) + t`` on one half, ``s, t`` from the other
    half (and the context); ``s`` is soft-clamped to ``(-clamp, clamp)`` by ``clamp * tanh(s / clamp)``."""

    def __init__(self, features: int, context_features: int = 0, *, hidden: int = 64, layers: int = 2,
                 parity: int = 0, clamp: float = 3.0):
        super().__init__()
        _check_features("AffineCoupling", features, 2)
        self.features, self.context_features, self.parity, self.clamp = features, context_features, parity % 2, clamp
        idx = torch.arange(features)
        cond = idx < features // 2 if self.parity == 0 else idx >= features - features // 2
        self.register_buffer("cond_idx", idx[cond], persistent=False)
        self.register_buffer("trans_idx", idx[~cond], persistent=False)
        self.net = _mlp(len(self.cond_idx) + context_features, 2 * len(self.trans_idx), hidden, layers)

    def _st(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        xc = x[:, self.cond_idx]
        inp = xc if not self.context_features else torch.cat([xc, context], dim=1)
        s, t = self.net(inp).to(x.dtype).chunk(2, dim=1)  # x's precision under autocast too
        return self.clamp * torch.tanh(s / self.clamp), t

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self._st(x, context)
        out = x.clone()
        out[:, self.trans_idx] = x[:, self.trans_idx] * torch.exp(s) + t
        return out, s.sum(1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self._st(y, context)
        out = y.clone()
        out[:, self.trans_idx] = (y[:, self.trans_idx] - t) * torch.exp(-s)
        return out, -s.sum(1)

    @classmethod
    def example(cls) -> tuple[AffineCoupling, Tensor, Tensor | None]:
        t = cls(3, 2, hidden=8, layers=2).double()
        _randomise(t, 0)
        return (t, *_example_inputs(3, 2))


def half_swap_permutation(features: int, conditioning: int, seed: int = 0) -> Tensor:
    """The permutation ``P`` of a mixing layer between two coupling layers that both condition on the first
    ``conditioning`` features and transform the rest: the features the layer before transformed go to the
    conditioning positions (as many as fit), and what it conditioned on (with any transformed left over) to the
    transformed positions, each group in a seeded random order. So at ``P``'s identity-initialised ``L U``
    every feature is transformed by one of any two consecutive layers, as with alternating halves, while the
    halves are reshuffled at every layer as with a random permutation (a random ``P`` alone leaves about half of
    the features on the same side: in 2-D, a coupling layer transforming the same feature twice). Returns
    ``perm`` for ``y[:, j] = x[:, perm[j]]``."""
    _check_features("half_swap_permutation", features, 1)
    if isinstance(conditioning, bool) or not isinstance(conditioning, int) or not 0 < conditioning < features:
        raise ConfigError(f"conditioning must be an int in 1..{features - 1} (the size of the half a coupling "
                          f"layer conditions on); got {conditioning!r}")
    g = torch.Generator().manual_seed(seed)
    transformed = conditioning + torch.randperm(features - conditioning, generator=g)
    k = min(conditioning, features - conditioning)
    rest = torch.cat([transformed[k:], torch.arange(conditioning)])
    rest = rest[torch.randperm(rest.numel(), generator=g)]
    return torch.cat([transformed[:k], rest])  # conditioning positions first: the k transformed, then from rest


@FLOW_TRANSFORMS.register("lu_linear")
class LULinear(Transform):
    """Invertible linear layer ``y = W x + b`` with ``W = P L U`` (Kingma & Dhariwal 2018, arXiv:1807.03039):
    ``P`` a fixed permutation, ``L`` unit lower triangular, ``U`` upper triangular with diagonal
    ``eps + softplus(raw)`` > 0, so ``log |det W| = sum log diag U``. ``L``, ``U`` start at the identity; ``P`` is
    ``perm`` (``y[:, j] = (L U x)[:, perm[j]]``), a seeded random one without it. Context-free: a context is not
    accepted."""

    def __init__(self, features: int, *, seed: int = 0, eps: float = 1e-3, perm: Tensor | None = None):
        super().__init__()
        _check_features("LULinear", features, 1)
        self.features, self.eps = features, eps
        if perm is None:
            perm = torch.randperm(features, generator=torch.Generator().manual_seed(seed))
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.shape != (features,) or not torch.equal(perm.sort().values, torch.arange(features)):
            raise ConfigError(f"LULinear perm must be a permutation of 0..{features - 1}; got {perm.tolist()}")
        self.register_buffer("perm", perm.clone())
        self.lower = nn.Parameter(torch.zeros(features, features))
        self.upper = nn.Parameter(torch.zeros(features, features))
        self.diag = nn.Parameter(torch.full((features,), math.log(math.expm1(1 - eps))))  # diag U = 1
        self.bias = nn.Parameter(torch.zeros(features))

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        d = self.eps + nn.functional.softplus(self.diag)
        upper = torch.triu(self.upper, 1) + torch.diag(d)
        return lower, upper, d

    def _no_context(self, x: Tensor, context: Tensor | None) -> None:
        self._check(x, None)
        if context is not None:
            raise ShapeError("LULinear takes no context (it is a fixed linear map); pass context=None")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._no_context(x, context)
        lower, upper, d = self._factors()
        y = ((x @ upper.T) @ lower.T).index_select(1, self.perm)  # P L U x, row-wise
        return y + self.bias, d.log().sum().expand(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._no_context(y, context)
        lower, upper, d = self._factors()
        z = (y - self.bias).index_select(1, torch.argsort(self.perm)).T  # undo P
        z = torch.linalg.solve_triangular(lower, z, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, z, upper=True).T
        return x, -d.log().sum().expand(y.shape[0])

    @classmethod
    def example(cls) -> tuple[LULinear, Tensor, Tensor | None]:
        t = cls(3, seed=2).double()
        _randomise(t, 0)
        return (t, *_example_inputs(3, 0))


@FLOW_TRANSFORMS.register("permutation")
class Permutation(Transform):
    """A fixed permutation of the features (log-determinant 0): :meth:`reverse` or :meth:`random` with a seed.
    Context-free: a context is not accepted."""

    def __init__(self, perm: Tensor):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        n = perm.numel()
        if perm.dim() != 1 or n < 1 or not torch.equal(perm.sort().values, torch.arange(n)):
            raise ConfigError(f"Permutation needs a permutation of 0..n-1; got {perm.tolist()}")
        self.features = n
        self.register_buffer("perm", perm)
        self.register_buffer("inv", torch.argsort(perm))

    @classmethod
    def reverse(cls, features: int) -> Permutation:
        return cls(torch.arange(features - 1, -1, -1))

    @classmethod
    def random(cls, features: int, seed: int = 0) -> Permutation:
        return cls(torch.randperm(features, generator=torch.Generator().manual_seed(seed)))

    def _no_context(self, x: Tensor, context: Tensor | None) -> None:
        self._check(x, None)
        if context is not None:
            raise ShapeError("Permutation takes no context (it is a fixed permutation); pass context=None")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._no_context(x, context)
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._no_context(y, context)
        return y[:, self.inv], y.new_zeros(y.shape[0])

    @classmethod
    def example(cls) -> tuple[Permutation, Tensor, Tensor | None]:
        return (cls.random(4, seed=3), *_example_inputs(4, 0))
