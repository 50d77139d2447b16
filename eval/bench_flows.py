"""Neural spline flows: genkit against zuko (and nflows) on held-out NLL, train step time and sampling time.

Contenders (same architecture on every side: 3 transforms, 8 bins, spline on ``[-5, 5]`` with identity tails and
boundary derivatives 1, minimum derivative 1e-3, conditioners with two hidden layers of 64 ReLU units, a standard
Normal base; the same Adam, lr, batch size, steps, batches and seeds):

- **coupling**: genkit's ``nsf`` family with ``mixing="none"`` (its default ``MaskedCouplingSpline`` x 3, parity
  alternating: the first ``ceil(D/2)`` features condition, then the last, and get splines of their own) against
  ``zuko.flows.NSF(passes=2)`` (zuko's coupling setting: a two-class MADE, the order flipped every transform: the
  same structure) and nflows' ``PiecewiseRationalQuadraticCouplingTransform`` (mask alternating; the conditioning
  half passes unchanged);
- **autoregressive**: genkit ``AutoregressiveSpline`` x 3 with ``Permutation.reverse`` between them against
  ``zuko.flows.NSF`` (fully autoregressive, the order flipped every transform: the same thing) and nflows'
  ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform`` (``num_blocks=1``, no residual blocks) with
  ``ReversePermutation``;
- **coupling+lu**: genkit's ``nsf`` family as a user builds it (``NeuralSplineFlow(D, layers=3, bins=8,
  bound=5.0, hidden=64, depth=2)``: masked coupling layers with its default ``mixing="lu"``, an ``LULinear``
  ``y = P L U x + b`` between them, as the NSF paper's coupling flows alternate LU-linear layers with couplings)
  against zuko's coupling setting with the same mixing between its transforms (``LULinearTransform`` from the
  identity, then ``PermutationTransform`` with genkit's permutation) and nflows' coupling with ``LULinear``
  (``identity_init``) + ``Permutation`` between its layers.

Rows:

1. **Held-out NLL** (nats per sample; lower is better) on moons and checkerboard (2-D; checkerboard's exact
   entropy is log 8), wine (13-D) and digits64 (64-D, dequantised) from ``genkit.data.tabular`` (standardised
   with the train split's statistics; train / validation / test splits), and a 32-D Gaussian mixture (genkit's
   ``gmm`` toy set at ``dim=32``: closed-form density, so its exact entropy is given; standardised with the train
   draw's statistics, NLL reported in the original units). All contenders of a set train in lock step on the
   same minibatches (the order rotates every step); the validation NLL is evaluated every ``--eval-every`` steps
   and the test NLL is read at the best validation evaluation (early stopping, the same rule for all). Medians
   over seeds. Target: genkit <= zuko + 0.01 nats.
2. **Train step time** (one Adam step on ``-log_prob(batch).mean()``), measured inside those runs: each step of
   each contender is timed (process CPU time and wall clock); the ratio genkit/zuko is paired within one step.
   Target: <= 1.0.
3. **Sampling time** of 1024 points at D = 2, 8, 32 (freshly built flows: the time does not depend on the
   weights), contenders interleaved, medians of ``--sample-repeats``.
4. **Coupling vs autoregressive at D = 32**: genkit's coupling NSF against zuko's autoregressive NSF, sampling
   speed (target >= 10x) and NLL on the 32-D mixture (target: within 0.05 nats); the plain coupling flow and the
   ``nsf`` family's default (``coupling+lu``).

Diagnostic contenders (on ``--diagnostic-sets``): ``genkit half_coupling``, genkit's ``CouplingSpline`` x 3 (nsf
``transform="coupling"``: the conditioning half, ``D // 2`` features, passes unchanged), and ``zuko-plain``,
zuko's ``GeneralCouplingTransform`` with zuko's spline split the same way: the two side by side tell the spline
parameterisation and initialisation from the coupling structure.

Differences that remain (each library's own definitions, listed in the results): the spline parameterisation
(genkit: floored softmax bins, ``1e-3 + softplus`` interior derivatives; zuko: softmax of soft-clamped logits,
``exp`` of soft-clamped derivatives), the conditioners' initialisation (genkit starts at the exact identity; zuko
and nflows keep torch's default), the mixing layer's parameterisation, and nflows' coupling split (its
conditioning half passes unchanged).

    python eval/bench_flows.py            # ~10-15 min on a shared 2-core machine (1 torch thread)
    python eval/bench_flows.py --quick    # ~1 min smoke run (tiny step counts; writes to a temporary folder)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, markdown_table, median, write_results  # noqa: E402

from genkit.data import held_out, load_dataset, load_tabular  # noqa: E402
from genkit.data.toy import gmm_params  # noqa: E402
from genkit.models.flows import (  # noqa: E402
    AutoregressiveSpline,
    CouplingSpline,
    Flow,
    LULinear,
    NeuralSplineFlow,
    Permutation,
    half_swap_permutation,
)

BINS, BOUND, HIDDEN, LAYERS, TRANSFORMS = 8, 5.0, 64, 2, 3
DEVICE = torch.device("cpu")  # --device; every contender and every tensor of a row lives there


def sync() -> None:
    """Wait for the device, so a timer around a step or a draw measures the work and not its launch."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def step_clock() -> float:
    """Per-step time: CPU process time on the CPU (what the machine's other load does not inflate), wall clock
    after a synchronize on a GPU (where the host's process time would miss the kernels)."""
    return time.process_time() if DEVICE.type == "cpu" else time.perf_counter()
KINDS = ("coupling", "autoregressive", "coupling+lu")


# ---------------------------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """A flow behind one interface: its parameters, ``log_prob(x)`` and ``sample(n)``."""

    module: torch.nn.Module
    log_prob: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[int], torch.Tensor]


def lu_permutation(d: int, i: int, seed: int, conditioning: int) -> torch.Tensor:
    """The fixed permutation ``P`` of the ``i``-th mixing layer ``W = P L U`` of the nsf family built with ``seed``
    (``half_swap_permutation(d, ceil(d / 2), seed + i)``: what the coupling before transformed moves to the half
    the next conditions on): the zuko and nflows flows of kind "coupling+lu" use the same rule for their own split
    (``conditioning`` features: ``ceil(d / 2)`` for genkit's masked coupling and zuko's ``passes=2``, ``d // 2``
    for nflows)."""
    return half_swap_permutation(d, conditioning, seed + i)


def build_genkit(kind: str, d: int, n_transforms: int = TRANSFORMS, seed: int = 0) -> Contender:
    """``kind`` "coupling+lu": the ``nsf`` family as a user builds it (``NeuralSplineFlow(d, layers=3, bins=8,
    bound=5.0, hidden=64, depth=2, seed=seed)``: its default masked coupling layers, zuko's ``NSF(passes=2)``
    structure, with its default ``mixing="lu"``, an ``LULinear`` between them as the NSF paper's coupling flows
    have; a fixed split alone never models the dependencies within the conditioning half); "coupling": the same
    with ``mixing="none"`` (the layers alternate their halves); "autoregressive"; or "half_coupling" (a
    diagnostic): ``CouplingSpline`` x 3, nsf ``transform="coupling"`` (the conditioning half passes unchanged)."""
    if kind in ("coupling+lu", "coupling"):
        mixing = "lu" if kind == "coupling+lu" else "none"
        family = NeuralSplineFlow(d, layers=n_transforms, bins=BINS, bound=BOUND, hidden=HIDDEN, depth=LAYERS,
                                  seed=seed, **({} if mixing == "lu" else {"mixing": mixing}))
        assert family.mixing == mixing and family.transform == "masked_coupling"  # the defaults this row stands for
        flow = family.flow
        lus = [t for t in flow.transforms if isinstance(t, LULinear)]
        assert all(torch.equal(t.perm, lu_permutation(d, i + 1, seed, (d + 1) // 2)) for i, t in enumerate(lus))
        return Contender(flow, flow.log_prob, lambda n: flow.sample(n))
    transforms: list = []
    for i in range(n_transforms):
        if kind == "half_coupling":
            transforms.append(CouplingSpline(d, bins=BINS, bound=BOUND, hidden=HIDDEN, layers=LAYERS, parity=i % 2))
        else:
            if i:
                transforms.append(Permutation.reverse(d))
            transforms.append(AutoregressiveSpline(d, bins=BINS, bound=BOUND, hidden=HIDDEN, layers=LAYERS))
    flow = Flow(transforms, d)
    return Contender(flow, flow.log_prob, lambda n: flow.sample(n))


def build_zuko(kind: str, d: int, seed: int = 0) -> Contender:
    from functools import partial

    import zuko
    from zuko.distributions import DiagNormal
    from zuko.lazy import UnconditionalDistribution
    from zuko.transforms import LULinearTransform, MonotonicRQSTransform, PermutationTransform

    if kind != "coupling+lu":  # NSF's spline is MonotonicRQSTransform(bound=5.0, slope=1e-3): genkit's bound and
        # minimum derivative
        flow = zuko.flows.NSF(d, transforms=TRANSFORMS, bins=BINS, hidden_features=(HIDDEN,) * LAYERS,
                              passes=2 if kind == "coupling" else None)
    else:  # NSF(passes=2)'s transforms in one order, genkit's mixing between them: y = P L U x (from the identity)
        split = (d + 1) // 2  # passes=2 in the order 0..d-1: the first ceil(d / 2) features condition
        layers: list = []
        for i in range(TRANSFORMS):
            if i:
                layers += [zuko.flows.UnconditionalTransform(LULinearTransform, torch.eye(d)),
                           zuko.flows.UnconditionalTransform(PermutationTransform,
                                                             lu_permutation(d, i, seed, split), buffer=True)]
            layers.append(zuko.flows.MaskedAutoregressiveTransform(
                d, passes=2, order=torch.arange(d), univariate=partial(MonotonicRQSTransform, slope=1e-3),
                shapes=[(BINS,), (BINS,), (BINS - 1,)], hidden_features=(HIDDEN,) * LAYERS))
        flow = zuko.flows.Flow(layers, UnconditionalDistribution(DiagNormal, loc=torch.zeros(d), scale=torch.ones(d),
                                                                 buffer=True))

    def sample(n: int) -> torch.Tensor:
        with torch.no_grad():
            return flow().sample((n,))

    return Contender(flow, lambda x: flow().log_prob(x), sample)


def build_zuko_plain_coupling(kind: str, d: int, seed: int = 0) -> Contender:
    """Diagnostic: zuko's ``GeneralCouplingTransform`` with zuko's spline, split like genkit's coupling (the
    conditioning half unchanged, an MLP on that half only): genkit's coupling structure with zuko's spline
    parameterisation and initialisation, to separate the two differences from zuko's coupling setting."""
    from functools import partial

    import zuko
    from zuko.distributions import DiagNormal
    from zuko.lazy import UnconditionalDistribution
    from zuko.transforms import MonotonicRQSTransform

    if kind != "coupling":
        raise ValueError("the plain zuko coupling flow is a coupling flow")
    idx = torch.arange(d)
    layers = [zuko.flows.GeneralCouplingTransform(
        d, mask=idx < d // 2 if i % 2 == 0 else idx >= d - d // 2, univariate=partial(MonotonicRQSTransform,
                                                                                     slope=1e-3),
        shapes=[(BINS,), (BINS,), (BINS - 1,)], hidden_features=(HIDDEN,) * LAYERS) for i in range(TRANSFORMS)]
    base = UnconditionalDistribution(DiagNormal, loc=torch.zeros(d), scale=torch.ones(d), buffer=True)
    flow = zuko.flows.Flow(layers, base)

    def sample(n: int) -> torch.Tensor:
        with torch.no_grad():
            return flow().sample((n,))

    return Contender(flow, lambda x: flow().log_prob(x), sample)


class _NflowsMLP(torch.nn.Module):
    """nflows' plain MLP, given the ``(inputs, context)`` call its coupling transforms make."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def build_nflows(kind: str, d: int, seed: int = 0) -> Contender:
    import nflows.transforms as nft
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow as NFlow
    from nflows.nn.nets import MLP
    from nflows.transforms import (
        CompositeTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        PiecewiseRationalQuadraticCouplingTransform,
        ReversePermutation,
    )

    layers: list = []
    for i in range(TRANSFORMS):
        if kind in ("coupling", "coupling+lu"):
            first = [-1] * (d // 2) + [1] * (d - d // 2)  # nflows: > 0 is transformed; genkit's parity 0 split
            mask = torch.tensor(first if i % 2 == 0 or kind == "coupling+lu" else first[::-1])
            if i and kind == "coupling+lu":  # genkit's mixing: y = P (L U x + b), from the identity
                layers += [nft.LULinear(d, identity_init=True), nft.Permutation(lu_permutation(d, i, seed, d // 2))]
            layers.append(PiecewiseRationalQuadraticCouplingTransform(
                mask, lambda n_in, n_out: _NflowsMLP(MLP([n_in], [n_out], [HIDDEN] * LAYERS)), num_bins=BINS,
                tails="linear",
                tail_bound=BOUND))
        else:
            if i:
                layers.append(ReversePermutation(d))
            layers.append(MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                d, HIDDEN, num_bins=BINS, tails="linear", tail_bound=BOUND, num_blocks=LAYERS - 1,
                use_residual_blocks=False))
    flow = NFlow(CompositeTransform(layers), StandardNormal([d]))

    def sample(n: int) -> torch.Tensor:
        with torch.no_grad():
            return flow.sample(n)

    return Contender(flow, flow.log_prob, sample)


LIBRARIES: dict[str, Callable[[str, int], Contender]] = {"genkit": build_genkit, "zuko": build_zuko,
                                                         "nflows": build_nflows}
DIAGNOSTICS = {"zuko-plain": build_zuko_plain_coupling}  # trained on --diagnostic-sets only


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "this tree" if package == "genkit" else "unknown"


def available(lib: str) -> bool:
    try:
        LIBRARIES[lib]("coupling", 2)
    except ImportError:
        return False
    return True


def build(lib: str, kind: str, d: int, seed: int, n_transforms: int = TRANSFORMS) -> Contender:
    torch.manual_seed(seed)  # the same seed for every contender (their parameter layouts differ)
    if n_transforms != TRANSFORMS or kind not in KINDS:
        c = build_genkit(kind, d, n_transforms, seed)
    else:
        c = {**LIBRARIES, **DIAGNOSTICS}[lib](kind, d, seed=seed)
    c.module.to(DEVICE)  # in place: the contender's closures keep pointing at the moved module
    return c


def contender_key(lib: str, kind: str, n_transforms: int = TRANSFORMS) -> str:
    return f"{lib} {kind}" + ("" if n_transforms == TRANSFORMS else f" x{n_transforms}")


# -------------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    nll_offset: float = 0.0  # added to every NLL: the log-determinant of a standardisation, to report raw units
    exact_test_nll: float | None = None
    about: str = ""


def gmm_nll(x: torch.Tensor, dim: int) -> float:
    weights, means, covs = gmm_params(dim)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(weights),
                                                torch.distributions.MultivariateNormal(means, covs))
    return float(-mix.log_prob(x.double()).mean())


def load_split(name: str, n_train: int, n_eval: int, seed: int = 0) -> Split:
    """The data of one NLL row; the splits do not depend on the training seed."""
    if name in ("moons", "checkerboard"):
        test, validation = held_out(name, n_eval)  # two fresh draws (seeds 1000, 1001) the train draw does not use
        train = load_dataset(name, n=n_train, generator=torch.Generator().manual_seed(seed))
        exact = math.log(8.0) if name == "checkerboard" else None  # uniform on 8 unit squares
        return Split(train, validation, test, exact_test_nll=exact,
                     about=f"{n_train} train points, fresh validation / test draws of {n_eval}")
    if name in ("wine", "digits64"):
        g = torch.Generator().manual_seed(seed)  # digits64's dequantisation noise
        parts = {s: load_tabular(name, split=s, generator=g) for s in ("train", "validation", "test")}
        return Split(parts["train"], parts["validation"], parts["test"],
                     about="genkit.data.load_tabular splits (70/10/20), standardised with the train statistics"
                           + ("; dequantised once" if name == "digits64" else ""))
    if name == "gmm32":
        draw = [load_dataset("gmm", n=k, dim=32, generator=torch.Generator().manual_seed(seed + j))
                for j, k in enumerate((n_train, n_eval, n_eval))]
        mean, std = draw[0].mean(0), draw[0].std(0)
        train, validation, test = ((x - mean) / std for x in draw)
        return Split(train, validation, test, nll_offset=float(std.log().sum()), exact_test_nll=gmm_nll(draw[2], 32),
                     about=f"genkit's gmm toy set at dim=32 (4 components), {n_train} train points, validation / "
                           f"test draws of {n_eval}; standardised with the train draw's mean / std, NLL in the "
                           "original units")
    raise ValueError(f"unknown set {name!r}")


# ---------------------------------------------------------------------------------------------- training


def nll(c: Contender, x: torch.Tensor, chunk: int = 2048) -> float:
    with torch.no_grad():
        return float(torch.cat([-c.log_prob(x[i:i + chunk]) for i in range(0, len(x), chunk)]).mean())


def train_lockstep(data: Split, names: list[tuple[str, str, int]], seed: int, steps: int, batch: int, lr: float,
                   eval_every: int) -> dict[str, dict[str, Any]]:
    """Train every ``(lib, kind, transforms)`` on the same minibatches, one step each in turn (the order rotates):
    Adam, the learning rate annealed from ``lr`` to 0 on a cosine over ``steps``."""
    d = data.train.shape[1]
    runs: dict[str, dict[str, Any]] = {}
    for lib, kind, n_transforms in names:
        c = build(lib, kind, d, seed, n_transforms)
        opt = torch.optim.Adam(c.module.parameters(), lr=lr)
        runs[contender_key(lib, kind, n_transforms)] = {
            "c": c, "opt": opt, "sched": torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps), "cpu_ms": [],
            "wall_ms": [], "evals": [], "failed": None, "parameters": sum(p.numel() for p in c.module.parameters())}
    keys = list(runs)
    g = torch.Generator().manual_seed(seed)
    n = data.train.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    for step in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        xb = data.train[perm[pos:pos + min(batch, n)]]
        pos += batch
        for key in keys[step % len(keys):] + keys[:step % len(keys)]:
            r = runs[key]
            if r["failed"]:
                continue
            sync()
            c0, w0 = step_clock(), time.perf_counter()
            loss = -r["c"].log_prob(xb).mean()
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            value = loss.item()
            r["sched"].step()  # timed: the same LR schedule runs on every side
            sync()
            r["cpu_ms"].append(1e3 * (step_clock() - c0))
            r["wall_ms"].append(1e3 * (time.perf_counter() - w0))
            if not math.isfinite(value):
                r["failed"] = f"non-finite loss at step {step}"
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            for key in keys:
                r = runs[key]
                if not r["failed"]:
                    r["evals"].append((step + 1, nll(r["c"], data.validation) + data.nll_offset,
                                       nll(r["c"], data.test) + data.nll_offset))
    out = {}
    for key, r in runs.items():
        finite = [e for e in r["evals"] if math.isfinite(e[1]) and math.isfinite(e[2])]
        best = min(finite, key=lambda e: e[1]) if finite else (None, math.nan, math.nan)
        out[key] = {"test_nll": best[2], "validation_nll": best[1], "best_step": best[0],
                    "final_test_nll": r["evals"][-1][2] if r["evals"] else math.nan, "evals": r["evals"],
                    "cpu_ms": r["cpu_ms"], "wall_ms": r["wall_ms"], "failed": r["failed"],
                    "parameters": r["parameters"]}
    return out


# ---------------------------------------------------------------------------------------------- sampling


def time_sampling(dims: list[int], libs: list[str], repeats: int, n: int = 1024) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in dims:
        flows = {f"{lib} {kind}": build(lib, kind, d, 0) for lib in libs for kind in KINDS}
        keys = list(flows)
        times: dict[str, list[float]] = {k: [] for k in keys}
        for k in keys:  # warm-up, discarded
            flows[k].sample(n)
        for r in range(repeats):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                sync()
                t0 = time.perf_counter()
                x = flows[k].sample(n)
                sync()
                times[k].append(1e3 * (time.perf_counter() - t0))
                if x.shape != (n, d) or not torch.isfinite(x).all():
                    raise RuntimeError(f"{k} at D={d} returned {tuple(x.shape)} samples or non-finite values")
        out[str(d)] = {k: {"median_ms": median(v), "repeats_ms": v} for k, v in times.items()}
        print(f"sampling D={d}: " + ", ".join(f"{k} {median(v):.1f} ms" for k, v in times.items()), flush=True)
    return out


# -------------------------------------------------------------------------------------------------- report


DIFFERENCES = [
    "Same on every side: 3 transforms, 8 bins, spline on [-5, 5] (zuko's NSF default bound; genkit and nflows set "
    "bound=5.0 / tail_bound=5.0) with identity (linear) tails and boundary derivatives exactly 1, minimum "
    "derivative 1e-3, conditioners with hidden layers (64, 64) and ReLU, a standard Normal base, the order flipped "
    "between transforms (genkit: coupling parity / Permutation.reverse; zuko: MAF's flipped orders; nflows: "
    "alternating masks / ReversePermutation), MADE hidden degrees cycling over 1..D-1 (zuko's MaskedMLP assigns "
    "its hidden units the same way), Adam with the same lr, the same minibatches, steps and seeds.",
    "Spline parameterisation: genkit (and nflows) put widths and heights through a softmax floored at 1e-3 of the "
    "interval per bin and interior derivatives through 1e-3 + softplus; zuko soft-clamps the logits "
    "(u / (1 + |2u / log 1e-3|)) before an unfloored softmax and takes exp of soft-clamped derivatives (range "
    "1e-3..1e3). nflows also divides the width and height logits of its MADE by sqrt(64).",
    "Initialisation: genkit starts every spline at the exact identity (its conditioners' last layer zeroed, the "
    "derivative biases at softplus^-1(1 - 1e-3)); zuko and nflows keep torch's default Linear init (a random "
    "spline at the start).",
    "Coupling structure: zuko's coupling setting (NSF(passes=2)) is a MADE with two degree classes: the "
    "conditioning half also gets an input-independent spline in every transform (outputs that see no input: their "
    "biases), and the conditioner reads all D inputs through a mask. genkit's default MaskedCouplingSpline is the "
    "same structure (the conditioning half's splines from learned constants; its MLP reads that half, before its "
    "spline, only); both condition on the first ceil(D/2) features (7 of wine's 13). nflows' coupling passes the "
    "conditioning half (D // 2) unchanged, as genkit's CouplingSpline (transform='coupling', the diagnostic "
    "half_coupling) does.",
    "coupling+lu: the mixing layer is y = P L U x + b on genkit's (LULinear: diag U = 1e-3 + softplus) and "
    "nflows' side (LULinear, the same positive diagonal) and y = P L U x on zuko's (LULinearTransform: no bias, an "
    "unconstrained diagonal of L); all three start at the identity times a permutation P of the same rule, the nsf "
    "family's half_swap_permutation (the features a coupling transformed move, in a seeded random order, to the "
    "half the next conditions on), each for its own split (genkit and zuko's NSF(passes=2) transforms, all in the "
    "order 0..D-1 here, condition on the first ceil(D/2), nflows on the first D // 2). Behind a mixing layer every "
    "side's couplings transform the same half (P alternates them).",
    "Sampling: genkit's Flow.sample also computes the samples' log-density (one pass); zuko's and nflows' sample "
    "only invert. genkit's autoregressive inverse takes D passes evaluating only feature i's MADE output block and "
    "spline in pass i; zuko's and nflows' evaluate every feature's in each of their D passes.",
    "The test NLL is read at the evaluation with the best validation NLL (every contender, the same rule); the "
    "runs are short (the step counts below), so the numbers also measure how fast each trains from its own "
    "initialisation, not only what the architecture can reach.",
]


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def build_report(payload: dict[str, Any], args: argparse.Namespace, libs: list[str]) -> str:
    nll_rows, time_rows = [], []
    summary = payload["summary"]
    for name, row in payload["nll"].items():
        s = row["settings"]
        for kind in KINDS:
            med = row["median_test_nll"]
            g, z = med.get(f"genkit {kind}"), med.get(f"zuko {kind}")
            nf = med.get(f"nflows {kind}")
            diff = g - z
            per_seed = "/".join(f"{r[f'genkit {kind}']['test_nll'] - r[f'zuko {kind}']['test_nll']:+.3f}"
                                for r in row["runs"].values())
            nll_rows.append([name, row["dim"], kind, f"{s['steps']} x {s['batch']}", len(row["seeds"]), fmt(g),
                             fmt(z), fmt(nf) if nf is not None else "-", f"{diff:+.3f}", per_seed,
                             "met" if diff <= 0.01 else "missed",
                             fmt(row["exact_test_nll"]) if row["exact_test_nll"] is not None else "-"])
            tr = row["step_time"][kind]
            time_rows.append([name, row["dim"], kind, tr["genkit_cpu_ms"], tr["zuko_cpu_ms"],
                              tr.get("nflows_cpu_ms", "-"), tr["paired_ratio_cpu"], tr["paired_ratio_wall"],
                              "met" if tr["paired_ratio_cpu"] <= 1.0 else "missed"])
    diag_rows = []
    for name, row in payload["nll"].items():
        med = row["median_test_nll"]
        if "zuko-plain coupling" in med:
            half, plain = "genkit half_coupling", "zuko-plain coupling"
            per_seed = "/".join(f"{r[half]['test_nll'] - r[plain]['test_nll']:+.3f}" for r in row["runs"].values())
            diag_rows.append([name, row["dim"], fmt(med["genkit coupling"]), fmt(med["zuko coupling"]),
                              fmt(med[half]), fmt(med[plain]), f"{med[half] - med[plain]:+.3f}", per_seed,
                              f"{med[half] - med['genkit coupling']:+.3f}"])
    diagnostics = [] if not diag_rows else [
        "### Diagnostic: the half-split coupling on both sides", "",
        "`genkit half_coupling`: genkit's `CouplingSpline` (nsf `transform=\"coupling\"`: the conditioning half, "
        "D // 2 features, passes unchanged; the default was this until the masked coupling replaced it). "
        "`zuko-plain`: zuko's `GeneralCouplingTransform` with zuko's spline (`MonotonicRQSTransform`, slope 1e-3), "
        "split the same way (the same parameter count). Side by side they isolate the spline parameterisation and "
        "initialisation; against the masked coupling the half split's cost.", "",
        markdown_table(["set", "D", "genkit coupling (masked)", "zuko NSF(passes=2)", "genkit half_coupling",
                        "zuko-plain coupling", "half - zuko-plain", "per seed", "half - masked"], diag_rows),
        ""]
    sample_rows = []
    for d, row in payload["sampling"].items():
        for kind in KINDS:
            g, z = row[f"genkit {kind}"]["median_ms"], row[f"zuko {kind}"]["median_ms"]
            nf = row.get(f"nflows {kind}", {}).get("median_ms", "-")
            sample_rows.append([d, kind, g, z, nf, g / z])
    md = [
        f"Settings: {args.threads} torch thread(s); Adam lr {args.lr}; architecture on every side: "
        f"{TRANSFORMS} transforms, {BINS} bins, bound {BOUND}, hidden ({HIDDEN}, {HIDDEN}); per-set steps x batch "
        f"and seeds in the table (the same for every contender), the learning rate annealed to 0 on a cosine; "
        f"validation every `eval_every` steps of the set (JSON `settings.sets`), test NLL at the best validation "
        f"evaluation; sampling: 1024 points, median of {args.sample_repeats} interleaved repeats. "
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in payload["libraries"].items()) + ".",
        "",
        "## Summary",
        "",
        "Kinds: `coupling` is the `nsf` family's masked coupling layers alone (`mixing=\"none\"`, parity "
        "alternating) against zuko's `NSF(passes=2)`; `coupling+lu` is the `nsf` family's default (an `LULinear` "
        "between its masked coupling layers) against zuko's "
        "`NSF(passes=2)` with the same mixing between its transforms; `autoregressive` is MADE splines against "
        "zuko's `NSF`.",
        "",
        markdown_table(["target", "measured", "met?"], summary["rows"]),
        "",
        "## Held-out NLL (nats per sample, median over seeds; lower is better)",
        "",
        "diff = genkit - zuko of the medians (target <= +0.01), and per seed (the seed-to-seed spread of the "
        "difference is the noise it is read against). `exact` is the test set's true NLL where the density is known.",
        "",
        markdown_table(["set", "D", "flow", "steps x batch", "seeds", "genkit", "zuko", "nflows", "diff",
                        "diff per seed", "target", "exact"], nll_rows),
        "",
        *diagnostics,
        "## Train step time (ms per Adam step, median over all steps and seeds)",
        "",
        ("Ratio genkit/zuko paired within each step (process CPU time; wall clock beside it). Target <= 1.0."
         if DEVICE.type == "cpu" else f"On {DEVICE}: the 'cpu' columns are synchronised wall-clock step times too. "
         "Ratio genkit/zuko paired within each step. Target <= 1.0."),
        "",
        markdown_table(["set", "D", "flow", "genkit cpu ms", "zuko cpu ms", "nflows cpu ms", "ratio (cpu)",
                        "ratio (wall)", "target"], time_rows),
        "",
        "## Sampling 1024 points (ms, wall clock, median of repeats)",
        "",
        markdown_table(["D", "flow", "genkit", "zuko", "nflows", "genkit/zuko"], sample_rows),
        "",
        "## genkit coupling NSF vs zuko autoregressive NSF at D = 32",
        "",
        "Target: sampling >= 10x faster at an NLL within 0.05 nats (on the 32-D mixture: "
        f"{payload['nll']['gmm32']['about'] if 'gmm32' in payload['nll'] else 'not run'}).",
        "",
        markdown_table(["genkit coupling", "D", "genkit ms", "zuko AR ms", "speed-up", "genkit NLL", "zuko AR NLL",
                        "diff", "exact NLL", "target"],
                       [[h["genkit"], h["dim"], h["genkit_coupling_sample_ms"], h["zuko_autoregressive_sample_ms"],
                         f"{h['speedup']:.1f}x", fmt(h["genkit_coupling_nll"]), fmt(h["zuko_autoregressive_nll"]),
                         f"{h['nll_diff']:+.3f}", fmt(h["exact_nll"]), "met" if h["met"] else "missed"]
                        for h in summary["coupling_vs_autoregressive_d32"]]),
        "",
        "## Data and parameter counts",
        "",
        *[f"- {k}: {v['about']}. Parameters: " + ", ".join(f"{c} {n}" for c, n in v["parameters"].items())
          for k, v in payload["nll"].items()],
        "",
        "## What differs",
        "",
        *[f"- {x}" for x in DIFFERENCES],
    ]
    failed = [f"{k} seed {s}: {r['failed']}" for k, v in payload["nll"].items() for s, runs in v["runs"].items()
              for kk, r in runs.items() if r["failed"]]
    if failed:
        md += ["", "## Failed runs", "", *[f"- {x}" for x in failed]]
    return "\n".join(md)


FIELDS = ("steps", "batch", "seeds", "n_train", "n_eval", "eval_every")
# name -> (steps, batch, seeds, n_train, n_eval, eval_every); the same for every contender. wine (124 train rows)
# overfits within ~50 steps: it is validated every 5 steps so that early stopping finds each contender's best
SETS = {
    "moons": (400, 256, 3, 8192, 2000, 25),
    "checkerboard": (400, 256, 3, 8192, 2000, 25),
    "wine": (150, 64, 7, 0, 0, 5),
    "digits64": (250, 128, 2, 0, 0, 25),
    "gmm32": (400, 128, 2, 8192, 2000, 25),
}
QUICK = {"moons": (30, 128, 1, 1024, 256, 10), "checkerboard": (30, 128, 1, 1024, 256, 10),
         "wine": (30, 64, 1, 0, 0, 5), "digits64": (15, 64, 1, 0, 0, 5), "gmm32": (20, 64, 1, 1024, 256, 10)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every set's step count")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 on every set (default: each set's own, "
                                                            "the table's `seeds` column)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sample-dims", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--sample-repeats", type=int, default=5)
    p.add_argument("--nflows-sets", nargs="*", default=["moons"],
                   help="sets on which nflows also trains (it is in every sampling row)")
    p.add_argument("--diagnostic-sets", nargs="*", default=["moons", "wine"],
                   help="sets on which genkit's half-split CouplingSpline and zuko's GeneralCouplingTransform "
                        "split the same way also train")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda: every library's flows and data run there (step "
                                                    "times: CPU process time on cpu, synchronised wall clock on cuda)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to test the script (~1 min)")
    p.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS}; --quick: a temp dir)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    table = QUICK if args.quick else SETS
    if args.quick:
        args.sample_repeats, args.sample_dims = 2, [2, 8]
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_flows_")) if args.quick else RESULTS)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Inputs to the softmax are not scaled down")  # nflows + plain MLP
    libs = [lib for lib in LIBRARIES if available(lib)]
    if "zuko" not in libs:
        raise SystemExit("zuko is not installed: pip install -e .[bench]")
    t_start = time.perf_counter()

    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload: dict[str, Any] = {"settings": {**plain,
                                            "sets": {k: dict(zip(FIELDS, table[k])) for k in args.sets},
                                            "architecture": {"transforms": TRANSFORMS, "bins": BINS, "bound": BOUND,
                                                             "hidden": [HIDDEN] * LAYERS}},
                               "libraries": {lib: _version(lib) for lib in libs},
                               "differences": DIFFERENCES, "nll": {}}
    for name in args.sets:
        steps, batch, seeds, n_train, n_eval, eval_every = table[name]
        steps = max(1, round(steps * args.steps_scale))
        seeds = seeds if args.seeds is None else args.seeds
        data = load_split(name, n_train, n_eval)
        data.train, data.validation, data.test = (t.to(DEVICE) for t in (data.train, data.validation, data.test))
        row_libs = [lib for lib in libs if lib != "nflows" or name in args.nflows_sets]
        names = [(lib, kind, TRANSFORMS) for kind in KINDS for lib in row_libs]  # each kind's side by side
        if name in args.diagnostic_sets:
            names += [("zuko-plain", "coupling", TRANSFORMS), ("genkit", "half_coupling", TRANSFORMS)]
        runs = {}
        for seed in range(seeds):
            t0 = time.perf_counter()
            runs[seed] = train_lockstep(data, names, seed, steps, batch, args.lr, eval_every)
            print(f"{name} seed {seed} ({time.perf_counter() - t0:.0f} s): "
                  + ", ".join(f"{k} {r['test_nll']:.3f}" for k, r in runs[seed].items()), flush=True)
        keys = list(runs[0])
        step_time = {}
        for kind in KINDS:
            g, z = f"genkit {kind}", f"zuko {kind}"
            paired = {c: [a / b for s in runs for a, b in zip(runs[s][g][c], runs[s][z][c])]
                      for c in ("cpu_ms", "wall_ms")}
            st = {"genkit_cpu_ms": median([t for s in runs for t in runs[s][g]["cpu_ms"]]),
                  "zuko_cpu_ms": median([t for s in runs for t in runs[s][z]["cpu_ms"]]),
                  "paired_ratio_cpu": median(paired["cpu_ms"]), "paired_ratio_wall": median(paired["wall_ms"])}
            if f"nflows {kind}" in keys:
                st["nflows_cpu_ms"] = median([t for s in runs for t in runs[s][f"nflows {kind}"]["cpu_ms"]])
            step_time[kind] = st
        payload["nll"][name] = {
            "dim": data.train.shape[1], "about": data.about, "exact_test_nll": data.exact_test_nll,
            "settings": {"steps": steps, "batch": batch, "eval_every": eval_every, "n_train": data.train.shape[0],
                         "n_validation": data.validation.shape[0], "n_test": data.test.shape[0]},
            "seeds": list(runs), "parameters": {k: runs[0][k]["parameters"] for k in keys},
            "median_test_nll": {k: median([runs[s][k]["test_nll"] for s in runs]) for k in keys},
            "step_time": step_time,
            "runs": {s: {k: {kk: vv for kk, vv in r.items() if kk not in ("cpu_ms", "wall_ms")} | {
                "median_cpu_ms": median(r["cpu_ms"]) if r["cpu_ms"] else math.nan} for k, r in runs[s].items()}
                for s in runs},
        }
    payload["sampling"] = time_sampling(args.sample_dims, libs, args.sample_repeats)

    rows = []
    for name, row in payload["nll"].items():
        for kind in KINDS:
            diff = row["median_test_nll"][f"genkit {kind}"] - row["median_test_nll"][f"zuko {kind}"]
            rows.append([f"NLL {name} {kind}: genkit <= zuko + 0.01", f"{diff:+.3f} nats",
                         "met" if diff <= 0.01 else "missed"])
    for name, row in payload["nll"].items():
        for kind in KINDS:
            r = row["step_time"][kind]["paired_ratio_cpu"]
            rows.append([f"train step {name} (D={row['dim']}) {kind}: genkit/zuko <= 1.0", f"{r:.2f}",
                         "met" if r <= 1.0 else "missed"])
    top = str(max(args.sample_dims))
    za = payload["sampling"][top]["zuko autoregressive"]["median_ms"]
    g32 = payload["nll"].get("gmm32", {}).get("median_test_nll", {})
    heads = []
    for kind, t in [("coupling", TRANSFORMS), ("coupling+lu", TRANSFORMS)]:
        key = contender_key("genkit", kind, t)
        gc = payload["sampling"][top][key]["median_ms"]
        h = {"genkit": key, "transforms": t, "dim": int(top), "genkit_coupling_sample_ms": gc,
             "zuko_autoregressive_sample_ms": za, "speedup": za / gc,
             "genkit_coupling_nll": g32.get(key, math.nan), "zuko_autoregressive_nll": g32.get("zuko autoregressive",
                                                                                               math.nan),
             "exact_nll": payload["nll"].get("gmm32", {}).get("exact_test_nll", math.nan)}
        h["nll_diff"] = h["genkit_coupling_nll"] - h["zuko_autoregressive_nll"]
        h["met"] = bool(h["speedup"] >= 10 and h["nll_diff"] <= 0.05)
        heads.append(h)
        rows.append([f"genkit {kind} ({t} transforms) samples >= 10x faster than zuko autoregressive "
                     f"({TRANSFORMS} transforms) at D={top}, at NLL (gmm32) within 0.05 nats of it",
                     f"{h['speedup']:.1f}x; {h['nll_diff']:+.3f} nats",
                     "met" if h["met"] else ("missed" if math.isfinite(h["nll_diff"]) else "not run")])
    payload["summary"] = {"rows": rows, "coupling_vs_autoregressive_d32": heads}
    payload["runtime_s"] = time.perf_counter() - t_start
    md = build_report(payload, args, libs) + f"\n\nRun time: {payload['runtime_s'] / 60:.1f} min.\n"
    paths = write_results("bench_flows", payload, md, out_dir=out)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
