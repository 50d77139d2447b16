"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, arXiv 2505.13447) and Modular MeanFlow (You, Liu, He 2025,
arXiv 2508.17426): one-step generation by regressing the *average* velocity of the probability-flow ODE.

Genkit time: ``t = 0`` data, ``t = 1`` noise, ``z_t = alpha_t x + sigma_t e`` (``(1 - t) x + t e`` on the
linear path, as in the paper). For ``r <= t`` the average velocity is
``u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau``, so ``z_r = z_t - (t - r) u(z_t, r, t)``: a learned jump.
The network is a two-time net read as genkit's flow map, ``u(z, r, t) = net(z, t, r)`` (it sees ``t`` and the gap
``t - r``, the paper's default conditioning), so ``x_s = x_t + (s - t) net(x_t, t, s)`` is the flow map of
:class:`~genkit.models.flow_map.FlowMapModel`, sampled by the jump sampler in 1 (default) or ``k`` steps, and
``net(z, t, t)`` is the velocity (the ``"ode"`` sampler runs any solver on it).

**The MeanFlow identity** ``u = v - (t - r) du/dt`` with the total derivative ``du/dt = v . d_z u + d_t u``
gives the target ``u_tgt = sg(v - (t - r) JVP)``, the JVP of ``(z, t, r) -> net(z, t, r)`` along the tangents
``(v, 1, 0)`` (genkit's argument order ``(z, t, r)``: the ``1`` belongs to ``t``, the ``0`` to ``r``; a swapped
order silently computes ``d_r u``). **How the JVP is computed** (``jvp=``; the same derivative either way, so
it is not part of the saved config): ``"auto"`` (default) runs the network's own JVP rules where it has them
(:meth:`genkit.nets.TwoTimeMLP.forward_jvp`: one pass whose output is also the prediction ``u``, the tangent
without a graph under stop-gradient; about twice a forward, where ``torch.func.jvp`` on a small CPU MLP costs
about 3x a forward and backward), provided no autocast is active and the inputs are float32 / float64; otherwise,
and always with ``jvp="torch"``, :func:`genkit.jvp.jvp` (``torch.func.jvp``) in float32 with autocast off and the
math attention kernel, plus an ordinary forward for ``u``. ``v`` is the path's conditional velocity (``e - x`` on
the linear path) or, when a frozen teacher is attached (:meth:`MeanFlow.from_teacher`), the teacher's marginal
velocity ``v(z_t, t)``.

**Loss** per sample: ``w ||Delta||^2`` with the squared error *summed* over dimensions, ``Delta = u - u_tgt``,
and the adaptive weight ``w = sg(1 / (||Delta||^2 + norm_eps)^norm_p)`` (``norm_p = 0`` is plain L2, 0.5
pseudo-Huber-like, 1 a relative error). Defaults ``norm_p = 0``, ``norm_eps = 0.01`` (see *Defaults* below; the
official JAX ImageNet configuration has ``norm_p = 1``, the paper's best ``p`` there; py-meanflow's CIFAR script
``norm_p = 0.75``).
``norm_eps`` is relative to an error summed over all dimensions, so it means less the bigger the sample.

**(r, t) sampler**: two logit-normal times ``sigmoid(N(time_mean, time_std))``, ``t`` the larger and ``r`` the
smaller, then ``r = t`` with probability ``1 - frac_r_neq_t`` (those samples are plain flow matching: the JVP
term vanishes), mapped into ``[t_min, t_max]``. ``frac_r_neq_t`` is the share of pairs with ``r != t``; the two
official repositories both call their knob "ratio" with opposite meanings (the JAX ``data_proportion = 0.75`` is
75% ``r = t``, py-meanflow's ``ratio = 0.75`` is 75% ``r != t``). Defaults ``time_mean = 0``,
``time_std = 1.5``, ``frac_r_neq_t = 0.75`` (see *Defaults*; the JAX ImageNet configuration is ``-0.4``, ``1.0``
and 25%, the paper's ablation there favouring 25%; py-meanflow's CIFAR one ``-2``, ``2`` and 75%).

**The network's time features.** MeanFlow's target holds ``d_t u``, the derivative of the network in ``t``;
through a Fourier time feature of frequency ``w`` it is ``w`` times the feature's own size, so genkit's default
MLP time features (up to ``w = 1000``, right for a velocity net) fill the target with high-frequency terms of
the network's own making. Measured (MLP 128 x 3, Adam 1e-3): distilling an exact 4-mode Gaussian-mixture field
for 4000 steps, the summed squared error stays at 100-500 with ``w`` up to 1000 (0.003 without ``r != t``
pairs) and the 1-NFE samples are far from the exact flow map (rms 1.0 at a cluster spacing of 2.8); with ``w``
up to 5 the error falls to about 0.006 and, at ``norm_p = 0``, 75% ``r != t`` and times ``(0, 1.5)``, the 1-NFE
sliced W2 to 0.08, the exact ODE's own. From scratch on digits (``eval/bench_onestep.py``'s set-up, the ImageNet
configuration) the 1-NFE Frechet distance *grew* with training at ``w = 1000`` (394 after 1200 steps, 892 after
4800) and falls at ``w = 5`` (325, 234). So MeanFlow's MLPs want smooth time features: ``train/train.py
--family meanflow`` builds its MLP with ``max_freq=5`` (:meth:`net_options`), and a MeanFlow on an MLP whose
features go above ``max_freq = 50`` warns. A UNet's time features are diffusers' sinusoidal projection of
``t * time_scale`` (frequencies up to ``time_scale``, 999 by default): distilling a 10-mode Gaussian mixture on
8x8 images (the digits' class means) into a ``TwoTimeUNet`` (channels 16, 32; 400 steps) the summed squared
error rose to 1e4-2e7 at ``time_scale = 999`` and fell to 5 at ``time_scale = 5`` (1-NFE rms to the exact flow
map 4.7 vs 2.0, the map's displacement 8.1), so MeanFlow's UNets get ``time_scale=5`` the same way (and warn
above 50). A ``norm_p > 0``
weight is not neutral either: its stop-gradient fixed point is a weighted mean that favours targets near the
prediction, so even without ``r != t`` pairs ``norm_p = 1`` moves the velocity at ``t = 1`` off the posterior
mean and one Euler step looks like a spread of samples (moons: 1-NFE sliced W2 0.25 at ``frac_r_neq_t = 0``,
the same as with 25% ``r != t`` pairs).

**Defaults.** With smooth time features, the best of the settings tried on moons (4800 steps, 1-NFE sliced W2)
was plain L2 (``norm_p = 0``) with 75% ``r != t`` pairs and the wider logit-normal ``(0, 1.5)``: 0.085, against
0.109 with the ImageNet configuration, 0.106 with the CIFAR one, 0.103 at ``norm_p = 0.5``, 0.174 at
``norm_p = 1`` (the rest as the default), 0.129 with the ImageNet times; on digits (1-NFE Frechet distance) 242
after 1200 steps and 141 after 4800, against 325 and 234 with the ImageNet configuration. Hence genkit's
defaults; at ImageNet scale, with a DiT, the paper's configuration is the measured one there.

**The JVP's tangent** (``tangent=``). MeanFlow's tangent is the target's own velocity, the conditional
``e - x`` from scratch; improved MeanFlow (Geng, Lu, Wu, Shechtman, Kolter, He 2025, arXiv 2512.02012) takes the
network's own velocity ``net(z, t, t)`` (no gradient, eval mode) as the tangent instead, while the target keeps
``v``: the total derivative is then along the model's marginal velocity, without the conditional velocity's
noise multiplied by the network's Jacobian. ``"target"`` is MeanFlow's, ``"model"`` improved MeanFlow's (one more
network forward a step), ``"auto"`` (default) ``"model"`` where ``modulation > 0`` and ``"target"`` otherwise. With
a teacher the tangent is always the teacher's velocity (noise-free already). Why ``"auto"``: at ``modulation = 0``
the two measured about the same (moons, 1-NFE sliced W2 0.128 with ``"model"`` vs 0.133 after 1200 steps,
0.083 vs 0.085 after 4800; digits, 1-NFE Frechet distance 250 vs 242 after 1200),
so MeanFlow keeps its own loss; at ``modulation > 0`` the gradient runs through the tangent term, and with the
conditional velocity there ``E ||(t - r) d_z u (e - x - v_marginal)||^2`` is part of what it minimises, a penalty
on the network's Jacobian that contracts the samples (moons, Modular MeanFlow at ``lambda = 1``: 1-NFE sliced W2
0.60 and sample sd 0.45 against the data's 0.99 with ``"target"``; 0.10 and 0.94 with ``"model"``; digits 1-NFE
Frechet distance 584 with ``"target"``, 453 with ``"model"``). Configs
saved before the option existed load as ``"target"``, what they were trained with.

**Modular MeanFlow** (``modulation = lambda`` in ``[0, 1]``): ``SG_lambda[z] = lambda z + (1 - lambda) sg(z)``
on the JVP term, ``L = w || u + (t - r) SG_lambda[du/dt] - v ||^2`` (same weighting, ``w`` stop-gradiented).
The loss *value* does not depend on lambda; its parameter gradient does: ``lambda = 0`` is exactly MeanFlow's
(the JVP term is a constant), ``lambda = 1`` backpropagates through the JVP, a double-backward (the JVP is kept
on the graph: ``torch.func.jvp`` outputs are differentiable with respect to the parameters it closes over). The
gradient is affine in lambda, ``(1 - lambda) g_MeanFlow + lambda g_1``; at ``lambda = 0`` (also the warm-up's
first step) no graph of the JVP is built, and the gradient is MeanFlow's bit for bit.
(The unofficial ``primepake/modular_meanflow`` recomputes the unmodulated target after modulating it, so its
lambda has no effect; here it is tested against autograd of the un-stopped residual.) The curriculum is
``lambda(step) = modulation * min(1, step / modulation_warmup)`` (no warm-up: ``modulation`` throughout).
``step`` is the buffer :attr:`MeanFlow.loss_steps`, the number of training-mode loss calls with gradients so far
(one per trainer step), saved with the weights: a resumed run continues the curriculum exactly, and it is the
same on every rank. **Cost of lambda > 0**: the JVP pass keeps its graph (memory: the activations of the
forward-mode pass, about twice a forward's) and the backward runs through the tangent computation as well
(second-order derivatives of every layer). Measured on CPU (median of 9 repeats of 15 steps, Adam, batch 256):
a ``lambda = 1`` step took 1.7x a MeanFlow step on a 2-D MLP 128 x 3 (259 vs 154 ms), 1.7x on a 1-D MLP 64 x 2
(53 vs 31 ms); a MeanFlow step itself took 3.9x / 4.0x a flow-matching step on the same MLP (39 / 7.7 ms): on
CPU with torch 2.14 every forward-mode op costs a Python-level decomposition (about 0.5-1 ms), so small nets
are dominated by it; on a GPU with big nets the JVP costs about two forwards and the ratio is smaller.

**Class-conditional** (``num_classes``, ``class_dropout``; :class:`~genkit.models.continuous.ContinuousModel`'s
contract: the net gets the labels as ``y``, dropped labels become the null label): classifier-free guidance is
folded into the target (the JAX code's ``omega``, ``kappa``): ``v~ = omega v + kappa u(z, t, t | c) +
(1 - omega - kappa) u(z, t, t | null)``, the network's own ``r = t`` outputs computed without gradient and in
eval mode (no dropout), applied where ``guidance_interval[0] <= t <= guidance_interval[1]`` and only to samples
that kept their label (dropped ones keep ``v`` and the null label). The effective guidance scale is
``omega / (1 - kappa)``; ``omega = 1, kappa = 0`` (default) is no guidance. Class dropout is a Bernoulli draw per
sample from the loss's generator (the JAX code drops a fixed count). Sampling then needs no guidance:
``model.sample(n, labels=c)`` is one network evaluation; ``guidance=`` with the jump sampler is refused (the
guidance is in the weights); with ``sampler="ode"`` it guides the velocity view like any field.

**The JVP pitfalls** handled here (tested in tests/test_meanflow.py):

- DDP: the JVP runs on ``self.net``, the plain module: genkit's trainer wraps the objective's forward (the
  loss runs inside ``_LossForward`` under DDP), so ``self.net`` inside :meth:`MeanFlow.loss` is never the DDP
  wrapper, and DDP still synchronises the gradients, because the whole loss ran inside the wrapped forward.
- Dropout: the JVP pass and the primal pass run under :func:`genkit.jvp.seeded_rng` with one seed drawn from
  the loss's generator: the same mask in both, the loss a function of the generator alone, the global RNG
  untouched.
- Precision: the JVP runs in float32 with autocast disabled; the primal forward (``u_pred``) keeps the
  caller's autocast.
- Attention: the JVP runs under ``sdpa_kernel(SDPBackend.MATH)``.
- With ``torch.func.jvp`` (``jvp="torch"``, autocast, or a net without JVP rules), ``u_pred`` comes from a
  separate ordinary forward (same dropout mask), not from the JVP's primal output: with
  ``modulation = 0`` the JVP runs under ``no_grad`` (its output is stop-gradiented), so no graph of the JVP pass
  is kept (py-meanflow's memory advice for uncompiled models), at the price of one more forward. The forward-mode
  kernels also compute the primal by other routes (e.g. ``mm`` then ``add`` for ``addmm``), so the JVP's primal
  can differ from the forward in the last bits; with the separate forward, the loss value is the same for
  every lambda.

>>> import torch
>>> from genkit.nets import MLP
>>> model = MeanFlow(MLP(2, hidden=32), sample_shape=(2,))
>>> loss, logs = model.loss(torch.randn(16, 2), generator=torch.Generator().manual_seed(0))
>>> model.sample(8).shape, model.sample(8, steps=2).shape
(torch.Size([8, 2]), torch.Size([8, 2]))
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError, ShapeError
from ..fields import Field, as_velocity, check_field
from ..frozen import Frozen
from ..guidance import Guidance
from ..jvp import network_jvp, seeded_rng
from ..nets.mlp import MLP
from ..nets.two_time import build as build_net
from ..nets.two_time import to_two_time
from ..nets.unet import UNet
from ..paths import Path, path_from_config
from ..sampling import Sampler
from ..solvers import Solution
from .continuous import ContinuousModel
from .flow_map import FlowMapModel
from .registry import FAMILIES
from .teachers import check_teacher, refuse_one_step_teacher, teacher_range, teacher_shape

__all__ = ["MeanFlow"]

#: the highest time-feature frequency of an MLP / UNet that MeanFlow takes without a warning (genkit's default is
#: 1000 / 999)
SMOOTH_FREQ = 50.0


def _real(name: str, value: Any, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be a finite number; got {value!r}; {fix}")
    return float(value)


def _unit(name: str, value: Any, meaning: str) -> float:
    v = _real(name, value, meaning)
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1] ({meaning}); got {v}")
    return v


@FAMILIES.register("meanflow")
class MeanFlow(FlowMapModel):
    """``MeanFlow(net, path=None, *, sample_shape=(2,), frac_r_neq_t=0.75, time_mean=0.0, time_std=1.5,
    norm_p=0.0, norm_eps=0.01, modulation=0.0, modulation_warmup=0, omega=1.0, kappa=0.0, guidance_interval=None,
    num_classes=None, class_names=None, null_label=None, class_dropout=0.0, teacher=None, t_min=None,
    t_max=None, jvp="auto", tangent="auto")`` (see the module docstring for the math).

    Args:
        net: a two-time network, or an ``MLP`` / ``UNet`` (copied into one that equals it for every ``s``).
        path: the teacher's path with a teacher, else ``"linear"``.
        sample_shape: shape of one sample.
        frac_r_neq_t: share of training pairs with ``r != t`` (``0``: flow matching only, no one-step sampler).
        time_mean, time_std: the logit-normal of both time draws.
        norm_p, norm_eps: the adaptive weight ``1 / (||Delta||^2 + norm_eps)^norm_p``.
        modulation, modulation_warmup: Modular MeanFlow's ``lambda`` in ``[0, 1]`` and its linear warm-up (steps).
        omega, kappa, guidance_interval: classifier-free guidance folded into the target (class-conditional
            models with a null label only); ``guidance_interval = (t_lo, t_hi)``, None: every time.
        num_classes, class_names, null_label, class_dropout: the conditional contract of
            :class:`~genkit.models.continuous.ContinuousModel`.
        teacher: a frozen genkit field whose velocity replaces the conditional one (never saved).
        t_min, t_max: time range of training and sampling; default the teacher's sampling range, else the path's.
        jvp: how the JVP is computed, ``"auto"`` (the net's own rules where it has them) or ``"torch"``.
        tangent: the JVP's ``z``-tangent, ``"target"`` (MeanFlow), ``"model"`` (improved MeanFlow) or ``"auto"``.
    """

    family = "meanflow"

    def __init__(self, net: nn.Module, path: Path | str | None = None, *, sample_shape: Sequence[int] = (2,),
                 frac_r_neq_t: float = 0.75, time_mean: float = 0.0, time_std: float = 1.5, norm_p: float = 0.0,
                 norm_eps: float = 0.01, modulation: float = 0.0, modulation_warmup: int = 0, omega: float = 1.0,
                 kappa: float = 0.0, guidance_interval: Sequence[float] | None = None,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 null_label: int | None = None, class_dropout: float = 0.0, teacher: Field | None = None,
                 t_min: float | None = None, t_max: float | None = None, jvp: str = "auto",
                 tangent: str = "auto"):
        if tangent not in ("auto", "target", "model"):
            raise ConfigError(f"tangent must be 'target' (the JVP along the target's velocity, MeanFlow's), 'model' "
                              f"(along the network's own velocity net(z, t, t), improved MeanFlow's) or 'auto' (model "
                              f"where modulation > 0, else target); got {tangent!r}")
        if jvp not in ("auto", "torch"):
            raise ConfigError(f"jvp must be 'auto' (the network's own JVP rules where it has them, else "
                              f"torch.func.jvp) or 'torch' (torch.func.jvp always); got {jvp!r}")
        if teacher is not None:
            check_field(teacher)
            path = teacher.path if path is None else path  # set_teacher checks that they agree
        super().__init__(to_two_time(net), "linear" if path is None else path, "velocity", sample_shape,
                         num_classes=num_classes, class_names=class_names, null_label=null_label,
                         class_dropout=class_dropout)
        self.frac_r_neq_t = _unit("frac_r_neq_t", frac_r_neq_t, "the share of training pairs with r != t; 0.25 "
                                  "is the official ImageNet setting, 0.75 the CIFAR one")
        self.time_mean = _real("time_mean", time_mean, "the logit-normal's mean, e.g. -0.4")
        self.time_std = _real("time_std", time_std, "the logit-normal's standard deviation, e.g. 1.0")
        if self.time_std <= 0:
            raise ConfigError(f"time_std must be > 0 (the logit-normal's standard deviation, e.g. 1.0); got "
                              f"{self.time_std}")
        self.norm_p = _real("norm_p", norm_p, "the adaptive weight's power: 0 (plain L2) to 1")
        self.norm_eps = _real("norm_eps", norm_eps, "the adaptive weight's constant, e.g. 0.01")
        if self.norm_p < 0 or self.norm_eps <= 0:
            raise ConfigError(f"need norm_p >= 0 and norm_eps > 0 (the weight 1 / (||Delta||^2 + norm_eps)^norm_p); "
                              f"got norm_p={self.norm_p}, norm_eps={self.norm_eps}")
        self.modulation = _unit("modulation", modulation, "Modular MeanFlow's lambda: 0 is MeanFlow, 1 backpropagates "
                                "through the JVP term")
        if isinstance(modulation_warmup, bool) or not isinstance(modulation_warmup, numbers.Integral) \
                or modulation_warmup < 0:
            raise ConfigError(f"modulation_warmup must be a number of steps >= 0 (0: no warm-up); got "
                              f"{modulation_warmup!r}")
        self.modulation_warmup = int(modulation_warmup)
        self.omega = _real("omega", omega, "the guidance weight of the conditional velocity (1: no guidance)")
        self.kappa = _real("kappa", kappa, "the weight of the model's own conditional velocity (0: none)")
        if self.omega < 0 or not 0.0 <= self.kappa < 1.0:
            raise ConfigError(f"need omega >= 0 and 0 <= kappa < 1 (the effective guidance scale is omega / "
                              f"(1 - kappa)); got omega={self.omega}, kappa={self.kappa}")
        if guidance_interval is not None:
            Guidance(1.0, tuple(guidance_interval))  # the same checks: a pair 0 <= t_lo < t_hi <= 1
            guidance_interval = tuple(float(v) for v in guidance_interval)
        self.guidance_interval = guidance_interval
        self.jvp = jvp  # how du/dt is computed (the same derivative either way): not part of the saved config
        if self.guided or guidance_interval is not None:
            given = ", ".join(f"{k}={v}" for k, v in (("omega", self.omega), ("kappa", self.kappa),
                                                        ("guidance_interval", guidance_interval))
                              if (k, v) not in (("omega", 1.0), ("kappa", 0.0), ("guidance_interval", None)))
            if self.num_classes is None:
                raise ConfigError(f"guidance in the target ({given}) needs a class-conditional model: pass "
                                  "num_classes=K and class_dropout=0.1 (a network with K + 1 classes), or drop "
                                  "omega / kappa / guidance_interval")
            if self.null_label is None:
                raise ConfigError(f"guidance in the target ({given}) needs the null label that class dropout "
                                  "trains: pass class_dropout=0.1 (and a network with num_classes + 1 classes)")
        if teacher is not None and t_min is None and t_max is None:
            t_min, t_max = teacher_range(teacher)
        self.t_max = 1.0 if t_max is None else float(t_max)
        self.t_min = self.path.t_min if t_min is None else float(t_min)
        self._check_range(self.t_min, self.t_max)
        # training-mode loss calls so far: the step of the modulation warm-up, saved with the weights
        self.register_buffer("loss_steps", torch.zeros((), dtype=torch.int64))
        self.frozen = Frozen()
        self.tangent = tangent
        if teacher is not None:
            self.set_teacher(teacher)
        base = getattr(self.net, "base", None)  # the one-time net inside TwoTimeMLP / TwoTimeUNet
        attr = "max_freq" if isinstance(base, MLP) else "time_scale" if isinstance(base, UNet) else None
        freq = None if attr is None else getattr(base, attr)  # the highest frequency of its time features
        if freq is not None and freq > SMOOTH_FREQ:
            warnings.warn(f"MeanFlow's target holds the network's time derivative d_t u, and this "
                          f"{type(base).__name__}'s time features reach frequency {freq:g} ({attr}), which fills it "
                          f"with high-frequency terms (the one-step samples can get worse with training; see the "
                          f"MeanFlow docstring); build the net with {type(base).__name__}(..., {attr}=5)",
                          stacklevel=2)

    @property
    def tangent_mode(self) -> str:
        """The tangent in effect, ``"model"`` or ``"target"`` (``"auto"``: model where ``modulation > 0``); with a
        teacher its velocity is the tangent whatever this says."""
        if self.tangent != "auto":
            return self.tangent
        return "model" if self.modulation > 0 else "target"

    @classmethod
    def net_options(cls, args: argparse.Namespace, kind: str) -> dict[str, Any]:
        """``train/train.py`` builds MeanFlow's nets with smooth time features (an MLP's ``max_freq=5``, a
        UNet's ``time_scale=5``; the module docstring says why)."""
        return {"max_freq": 5.0} if kind == "mlp" else {"time_scale": 5.0, "time_shift": 0.0} if kind == "unet" else {}

    @property
    def default_jumps(self) -> int:
        """One jump: the one-step sampler."""
        return 1

    @property
    def guided(self) -> bool:
        """Whether guidance is folded into the training target (``omega != 1`` or ``kappa != 0``)."""
        return self.omega != 1.0 or self.kappa != 0.0

    # --- the teacher ----------------------------------------------------------------------------------
    def set_teacher(self, teacher: Field | None) -> None:
        """Attach (or with None detach) a frozen teacher field: its velocity ``v(z_t, t)`` replaces the conditional
        velocity as the JVP tangent and in the target. It must share the model's path, sample shape and classes."""
        if teacher is None:
            self.frozen.set("teacher", None)
            return
        check_field(teacher)
        refuse_one_step_teacher(teacher, "MeanFlow")
        check_teacher(teacher, self.path, self.sample_shape, self.family)
        base = getattr(teacher, "base", teacher)
        k = getattr(teacher, "num_classes", getattr(base, "num_classes", None))
        if k != self.num_classes:
            raise ConfigError(f"the teacher has num_classes={k} but the MeanFlow model {self.num_classes}; a "
                              "class-conditional student needs a teacher of the same classes (and its null label "
                              "under class dropout), an unconditional one an unconditional teacher")
        if self.null_label is not None and getattr(teacher, "null_label", getattr(base, "null_label", None)) \
                != self.null_label:
            raise ConfigError(f"class dropout replaces labels by the null label {self.null_label}, which the "
                              "teacher has not learned; use a teacher trained with class dropout, or class_dropout=0")
        self.frozen.set("teacher", teacher)

    @property
    def teacher(self) -> Field | None:
        return self.frozen.get("teacher")

    @classmethod
    def from_teacher(cls, teacher: Field, net: nn.Module | None = None, **kwargs: Any) -> MeanFlow:
        """A MeanFlow model distilling ``teacher`` (any genkit field: a flow-matching or diffusion checkpoint from
        ``genkit.load``, ``genkit.from_diffusers``, an analytic field), of the teacher's path, sample shape, time
        range and classes. The teacher's marginal velocity ``v(z_t, t)`` is the JVP tangent and the target's
        velocity (lower variance than the conditional ``e - x``). Without ``net`` the network is a two-time copy
        of the teacher's (needs a velocity network on unscaled inputs, i.e. flow matching), so ``u(z, t, t)`` is
        the teacher's velocity from step 0. The data the loss is given are the ``x_0`` of ``z_t = alpha x_0 +
        sigma e``: real data (``z_t`` then follows the data's marginals, where the teacher was trained), or the
        teacher's own samples (then the student learns exactly the teacher's flow map). Other keyword arguments
        go to :class:`MeanFlow`."""
        check_field(teacher)
        refuse_one_step_teacher(teacher, "MeanFlow")
        shape = teacher_shape(teacher)
        if shape is None:
            raise ConfigError(f"cannot tell the sample shape of teacher {type(teacher).__name__}; build "
                              "MeanFlow(net, sample_shape=..., teacher=teacher) directly")
        if net is None:
            plain = isinstance(teacher, ContinuousModel) and type(teacher).net_input is ContinuousModel.net_input
            if not (plain and teacher.prediction == "velocity"):
                raise ConfigError(f"the {getattr(teacher, 'family', type(teacher).__name__)} teacher's network does "
                                  f"not output the velocity of its input (prediction "
                                  f"{getattr(teacher, 'prediction', None)!r}, scaled inputs), so its weights are no "
                                  "starting average velocity; pass net= (e.g. genkit.nets.two_time.TwoTimeMLP) to "
                                  "train from scratch")
            net = teacher.net
        t_min, t_max = teacher_range(teacher)
        classes = {}
        if getattr(teacher, "num_classes", None) is not None:
            classes = {"num_classes": teacher.num_classes, "class_names": getattr(teacher, "class_names", None),
                       "null_label": getattr(teacher, "null_label", None)}
        kwargs = {"path": teacher.path, "t_min": t_min, "t_max": t_max, **classes, **kwargs}
        return cls(net, sample_shape=shape, teacher=teacher, **kwargs)

    # --- the average velocity and its derivative --------------------------------------------------------
    def average_velocity(self, z: Tensor, r: Tensor | float, t: Tensor | float, labels: Tensor | None = None,
                         **cond: Any) -> Tensor:
        """``u(z, r, t) = net(z, t, r)``, the average velocity over ``[r, t]`` (``z_r = z - (t - r) u``)."""
        return self.secant(z, t, r, labels, **cond)

    def time_derivative(self, z: Tensor, r: Tensor, t: Tensor, v: Tensor, *, create_graph: bool = False,
                        **cond: Any) -> tuple[Tensor, Tensor]:
        """``(u(z, r, t), du/dt)`` with the total derivative ``du/dt = v . d_z u + d_t u`` along the path
        (``dr/dt = 0``): one JVP of ``(z, t, r) -> net(z, t, r, **cond)`` with tangents ``(v, 1, 0)`` by
        :func:`genkit.jvp.network_jvp` in this model's ``jvp`` mode (the net's own rules, or ``torch.func.jvp``
        in full precision with the math attention kernel); both outputs carry a graph only with
        ``create_graph``. ``cond`` goes to the network as is (``y=`` labels)."""
        t, r = self._check(z, t, r)
        with torch.enable_grad() if create_graph else torch.no_grad():
            u, dudt, _ = network_jvp(self.net, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)),
                                     create_graph=create_graph, mode=self.jvp, **cond)
        return u, dudt

    def modulation_at(self, step: int) -> float:
        """Modular MeanFlow's ``lambda`` at training step ``step``: ``modulation * min(1, step / warmup)``."""
        if self.modulation_warmup == 0:
            return self.modulation
        return self.modulation * min(1.0, step / self.modulation_warmup)

    # --- training ---------------------------------------------------------------------------------------
    def sample_times(self, n: int, *, generator: torch.Generator | None = None, device: Any = None,
                     dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(t, r)``, each ``[n]``, ``r <= t``: two logit-normal draws (max and min), then ``r = t`` with
        probability ``1 - frac_r_neq_t``, in ``[t_min, t_max]``. Draws ``randn(2, n)`` then ``rand(n)``."""
        a = torch.sigmoid(torch.randn(2, n, generator=generator, device=device, dtype=torch.float64)
                          * self.time_std + self.time_mean)
        t, r = a.max(0).values, a.min(0).values
        dtype = torch.get_default_dtype() if dtype is None else dtype
        keep = torch.rand(n, generator=generator, device=device, dtype=torch.float64) < self.frac_r_neq_t
        r = torch.where(keep, r, t)
        span = self.t_max - self.t_min
        t, r = self.t_min + span * t, self.t_min + span * r
        return t.to(dtype), r.to(dtype)

    def _velocity(self, x0: Tensor, eps: Tensor, z: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The velocity of the tangent and the target: the teacher's at ``(z, t)``, else the conditional one."""
        teacher = self.frozen.get("teacher")
        if teacher is None:
            return self.path.from_x0_eps(x0, eps, z, t, "velocity")
        v = as_velocity(teacher)(z, t) if y is None else as_velocity(teacher)(z, t, labels=y)
        if v.shape != z.shape:
            raise ShapeError(f"the teacher returned shape {tuple(v.shape)} for inputs {tuple(z.shape)}; use a teacher "
                             "trained on samples of this model's sample_shape")
        return v.to(z.dtype)

    @contextlib.contextmanager
    def _eval_net(self) -> Iterator[None]:
        """The network in eval mode (no dropout) for the block, then back in its own mode."""
        was = self.net.training
        self.net.eval()
        try:
            yield
        finally:
            self.net.train(was)

    def _own_velocity(self, z: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        """The JVP tangent of ``tangent="model"``: the network's own velocity ``net(z, t, t)`` (eval mode; the
        caller holds no_grad; with labels, the conditional one, which has learned any guidance folded into the
        target)."""
        with self._eval_net():
            return self.net(z, t, t, **cond)

    def _guide(self, z: Tensor, t: Tensor, v: Tensor, labels: Tensor, y: Tensor) -> Tensor:
        """``omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null)`` where guided (inside the
        interval, label kept), ``v`` elsewhere; the network in eval mode, no gradient."""
        apply = y != self.null_label
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            apply = apply & (t >= lo) & (t <= hi)
        with self._eval_net():
            both = self.net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]),
                            y=torch.cat([labels, torch.full_like(labels, self.null_label)]))
        u_c, u_null = both.to(v.dtype).chunk(2)
        guided = self.omega * v + self.kappa * u_c + (1.0 - self.omega - self.kappa) * u_null
        return torch.where(apply.reshape((-1,) + (1,) * (v.ndim - 1)), guided, v)

    def loss(self, batch: Tensor | tuple[Tensor, Tensor],
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The MeanFlow (Modular MeanFlow for ``modulation > 0``) loss on ``batch`` (``x [B, *sample_shape]``, or
        ``(x, labels [B])`` for a class-conditional model). ``generator`` draws, in order: the noise, the times
        (:meth:`sample_times`), the class dropout, and the seed of the network passes (dropout). Logs: ``mse``
        (the plain summed squared error, batch mean), ``frac_r_neq_t`` (this batch's share of ``r != t``) and
        ``modulation`` (lambda this step)."""
        x0, labels = self.split_batch(batch)
        check_generator(generator, f"{self.family}.loss")
        b, device, dtype = x0.shape[0], x0.device, x0.dtype
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
        t, r = self.sample_times(b, generator=generator, device=device, dtype=dtype)
        y = None if labels is None else self.drop_labels(labels, generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        cond = {} if y is None else {"y": y}
        z = self.path.sample(x0, t, eps)
        with torch.no_grad():
            v = self._velocity(x0, eps, z, t, y)
            if self.guided:
                v = self._guide(z, t, v, labels, y)
            own = self.tangent_mode == "model" and self.teacher is None
            tangent = self._own_velocity(z, t, cond) if own else v
        training = self.training and torch.is_grad_enabled()
        lam = self.modulation_at(int(self.loss_steps))
        graph = lam > 0 and torch.is_grad_enabled()  # lambda = 0 (the warm-up's start): MeanFlow's own path
        t, r = self._check(z, t, r)
        with seeded_rng(seed, device):
            u, dudt, is_forward = network_jvp(self.net, (z, t, r), (tangent, torch.ones_like(t), torch.zeros_like(r)),
                                              create_graph=graph, mode=self.jvp, **cond)
        if graph:  # SG_lambda[du/dt]
            dudt = lam * dudt + (1.0 - lam) * dudt.detach()
        if not is_forward:  # u from an ordinary forward with the JVP pass's dropout mask
            with seeded_rng(seed, device):
                u = self.net(z, t, r, **cond)
        gap = (t - r).reshape((-1,) + (1,) * (x0.ndim - 1))
        target = v - gap * dudt
        err = (u - target).flatten(1).pow(2).sum(1)
        weight = (err.detach() + self.norm_eps).pow(-self.norm_p)
        loss = (weight * err).mean()
        if training:
            self.loss_steps += 1
        logs = {"mse": err.detach().mean(), "frac_r_neq_t": (r != t).to(dtype).mean(),
                "modulation": torch.tensor(lam)}
        return loss, logs

    # --- sampling ---------------------------------------------------------------------------------------
    def _draw(self, n: int, sampler: Sampler, generator: torch.Generator | None, device: Any,
              return_solution: bool, cond: dict[str, Any], labels: Any = None,
              guidance: Guidance | float | None = None) -> Tensor | Solution:
        if guidance is not None and sampler.name == "jumps":
            trained = (f"this model was trained with omega={self.omega}, kappa={self.kappa} (effective scale "
                       f"{self.omega / (1 - self.kappa):g})" if self.guided else
                       "this model was trained without it (omega=1, kappa=0): retrain with omega / kappa")
            raise ConfigError(f"MeanFlow's jumps take no guidance=: the guidance is folded into the weights during "
                              f"training, {trained}; sample with labels= alone (one evaluation per jump), or guide "
                              "the velocity view with sampler='ode'")
        return super()._draw(n, sampler, generator, device, return_solution, cond, labels, guidance)

    # --- config -----------------------------------------------------------------------------------------
    def extra_config(self) -> dict[str, Any]:
        return {"frac_r_neq_t": self.frac_r_neq_t, "time_mean": self.time_mean, "time_std": self.time_std,
                "norm_p": self.norm_p, "norm_eps": self.norm_eps, "modulation": self.modulation,
                "modulation_warmup": self.modulation_warmup, "omega": self.omega, "kappa": self.kappa,
                "guidance_interval": None if self.guidance_interval is None else list(self.guidance_interval),
                "t_min": self.t_min, "t_max": self.t_max, "tangent": self.tangent}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MeanFlow:
        """Rebuild without a teacher (attach one with :meth:`set_teacher` to distil further)."""
        c = dict(config)
        keys = ("frac_r_neq_t", "time_mean", "time_std", "norm_p", "norm_eps", "modulation", "modulation_warmup",
                "omega", "kappa", "guidance_interval", "t_min", "t_max")
        return cls(build_net(c["net"]), path_from_config(c["path"]), sample_shape=c["sample_shape"],
                   **{k: c[k] for k in keys}, tangent=c.get("tangent", "target"), **cls.class_config(c))

    # --- registry hooks ---------------------------------------------------------------------------------
    @classmethod
    def example(cls) -> tuple[MeanFlow, Tensor]:
        """A 2-D model (two-time MLP 16 x 1, seeded; half the pairs with ``r != t``) and 32 points of a
        Gaussian."""
        from ..nets import MLP

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = cls(MLP(2, hidden=16, depth=1, time_dim=8, max_freq=5), sample_shape=(2,), frac_r_neq_t=0.5)
        g = torch.Generator().manual_seed(0)
        return model, 0.5 * torch.randn(32, 2, generator=g) + 0.5

    cli_defaults: ClassVar[dict[str, Any]] = {
        "path": "linear", "frac_r_neq_t": 0.75, "time_mean": 0.0, "time_std": 1.5, "norm_p": 0.0, "norm_eps": 0.01,
        "modulation": 0.0, "modulation_warmup": 0, "omega": 1.0, "kappa": 0.0, "guidance_interval": None,
        "tangent": "auto"}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--frac-r-neq-t", type=float, help="share of training pairs with r != t (default: 0.75; "
                                                              "0 is flow matching only)")
        group.add_argument("--time-mean", type=float, help="mean of the logit-normal time draws (default: 0)")
        group.add_argument("--time-std", type=float, help="std of the logit-normal time draws (default: 1.5)")
        group.add_argument("--norm-p", type=float, help="power p of the adaptive weight 1 / (err + c)^p "
                                                        "(default: 0, plain L2; the paper's ImageNet 1.0)")
        group.add_argument("--norm-eps", type=float, help="constant c of the adaptive weight (default: 0.01)")
        group.add_argument("--modulation", type=float, help="Modular MeanFlow's lambda in [0, 1] (default: 0, "
                                                            "MeanFlow; > 0 backpropagates through the JVP)")
        group.add_argument("--modulation-warmup", type=int, help="steps of lambda's linear warm-up (default: 0)")
        group.add_argument("--omega", type=float, help="guidance weight folded into the target (default: 1, none; "
                                                       "needs --conditional)")
        group.add_argument("--kappa", type=float, help="weight of the model's own conditional velocity in the "
                                                       "guided target (default: 0)")
        group.add_argument("--guidance-interval", help="times lo,hi where the guided target applies (default: all)")
        group.add_argument("--tangent", choices=("auto", "target", "model"),
                           help="the JVP's z-tangent: target (the target's velocity, MeanFlow), model (the net's own "
                                "velocity, improved MeanFlow), auto (model where --modulation > 0; default)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: nn.Module, sample_shape: Sequence[int]) -> MeanFlow:
        interval = args.guidance_interval
        if interval is not None:
            try:
                interval = [float(v) for v in str(interval).split(",")]
            except ValueError:
                raise ConfigError(f"--guidance-interval must be two times lo,hi like 0.1,0.9; got {interval!r}"
                                  ) from None
            if len(interval) != 2:
                raise ConfigError(f"--guidance-interval must be two times lo,hi like 0.1,0.9; got "
                                  f"{args.guidance_interval!r}")
        return cls(net, args.path, sample_shape=sample_shape, frac_r_neq_t=args.frac_r_neq_t,
                   time_mean=args.time_mean, time_std=args.time_std, norm_p=args.norm_p, norm_eps=args.norm_eps,
                   modulation=args.modulation, modulation_warmup=args.modulation_warmup, omega=args.omega,
                   kappa=args.kappa, guidance_interval=interval, tangent=args.tangent, **cls.class_options(args))
