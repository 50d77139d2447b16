"""What the scripts in train/, samplers/ and eval/ share: finding a checkpoint, turning the sampling flags
(``--solver``, ``--steps``, ``--grid``, ``--t-max``) into a model's sampler the same way in every script
(:func:`resolve_sampler`), a log line per log step without a progress bar, and reporting genkit errors as one
line, and loading a distillation teacher (:func:`load_teacher`: a genkit checkpoint or a diffusers folder). The
library itself never imports this module."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, GenkitError, SolverError, TrainingInterrupted

__all__ = ["checkpoint_dir", "script_device", "run_main", "ScriptSampler", "resolve_sampler", "named_grids",
           "AUTO_T_MAX", "log_lines", "trained_data", "check_data_matches", "tokens_held_out", "step_list",
           "samples_held_out", "held_out_nll", "SAMPLES_SPLIT_SEED",
           "is_diffusers_folder", "load_teacher", "TeacherSamples", "sample_distances", "digits_features",
           "ScriptParser", "HelpFormatter", "save_picture", "target_summary"]

#: The start chosen for a stochastic solver whose reverse SDE is singular at the model's own start (t = 1 of a
#: flow-matching path, where alpha = 0): what the SDE solvers' own error suggests. ``--t-max`` overrides it.
AUTO_T_MAX = 0.99
#: The ODE steps a script uses when neither --steps nor the solver (a searched solver's N) says.
DEFAULT_ODE_STEPS = 32


def script_device(name: str):
    """The ``--device`` of a script as a ``torch.device``; a GPU asked for where CUDA is missing is a ConfigError.

    >>> script_device("cpu")
    device(type='cpu')
    """
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for a GPU but CUDA is not available here; use --device cpu")
    return device


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (``--out`` of train/train.py) holding ``checkpoint/``."""
    p = Path(path)
    return p / "checkpoint" if not (p / "config.json").exists() and (p / "checkpoint").is_dir() else p


def run_main(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; a genkit error becomes one ``error: ...`` line on stderr and status 2.

    >>> def main(argv):
    ...     raise GenkitError("bad --steps 0; use a positive integer")
    >>> run_main(main, [])
    2
    """
    try:
        main(argv)
    except GenkitError as e:
        print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
        signum = getattr(e, "signum", None)  # TrainingInterrupted: the shell's status for that signal (130, 143)
        return 128 + signum if isinstance(e, TrainingInterrupted) and signum is not None else 2
    return 0


def named_grids() -> list[str]:
    """The grid names a script's ``--grid`` takes (a custom grid needs explicit times, so not by name)."""
    from .solvers import GRIDS

    return [name for name in GRIDS.names() if name != "custom"]


@dataclass
class ScriptSampler:
    """A script's sampler and what its outputs say about it.

    sampler: the :class:`~genkit.sampling.Sampler` to give ``model.sample(sampler=...)``.
    kind: ``"learned jumps"``, ``"ODE solver"`` or ``"SDE solver"`` (on the model's field).
    solver: the solver's name as given (a saved searched solver's name, a registry name, a folder's solver
        name) or the sampler's name (``jumps``).
    steps: the step count (None for adaptive solvers, which choose their own).
    grid: the grid's true label: its name, ``"searched"`` for a searched solver's own times, ``"adaptive"``,
        ``"uniform in t"`` for jumps, or ``"none"`` for a one-pass sampler (a flow's ``exact``, an snf's ``path``:
        no steps, no times).
    t_range: ``(t_max, t_min)`` the samples are drawn over (None where the model fills it in by name).
    note: how a setting was chosen that the user did not give (e.g. a start below a singular t = 1).
    """

    sampler: Any
    kind: str
    solver: str
    steps: int | None
    grid: str
    t_range: tuple[float, float] | None = None
    note: str | None = None

    def describe(self) -> str:
        """One line, e.g. ``"heun (ODE solver), 32 steps, uniform grid"``."""
        if self.grid == "none":  # a one-pass sampler (exact)
            return f"{self.solver} ({self.sampler.describe()})"
        unit = "jumps" if self.kind == "learned jumps" else "steps"
        steps = "adaptive steps" if self.steps is None else f"{self.steps} {unit}"
        if self.kind == "learned jumps":
            return f"{'default' if self.steps is None else self.steps} learned jumps, uniform in t"
        if self.grid == "uniform in t":  # another named sampler on the model's range (restart, masked ancestral)
            return f"{self.sampler.describe()}, uniform in t"
        grid = "its own searched times" if self.grid == "searched" else f"{self.grid} grid"
        start = f" from t={self.t_range[0]:g}" if self.t_range is not None and self.t_range[0] < 1 else ""
        return f"{self.solver} ({self.kind}), {steps}, {grid}{start}"

    def record(self) -> dict[str, Any]:
        """The JSON fields of the outputs: sampler kind, solver, steps, grid, start time and any note."""
        out = {"sampler": self.kind, "solver": self.solver, "steps": self.steps, "grid": self.grid,
               "t_max": None if self.t_range is None else self.t_range[0]}
        if self.note:
            out["note_sampler"] = self.note
        return out


def _flag(name: str, flags: dict[str, str] | None) -> str:
    return (flags or {}).get(name, f"--{name.replace('_', '-')}")


def resolve_sampler(model: Any, solver: str | None = None, steps: int | None = None, grid: str | None = None,
                    t_max: float | None = None, *, flags: dict[str, str] | None = None) -> ScriptSampler:
    """``--solver`` / ``--steps`` / ``--grid`` / ``--t-max`` as ``model``'s sampler, alike for every solver.

    ``solver`` is a sampler name (``jumps``), a registry name, a searched solver saved by name or a searched-
    solver folder (whatever :func:`genkit.get_solver` finds), or None: the model's default sampler. Defaults
    are the solver's own (a searched solver's N steps and times), else 32 steps on the model's uniform grid.
    A setting the sampler would ignore is a ConfigError naming the flag to drop: ``--grid``/``--t-max`` with a
    searched solver (its own times), with learned jumps (uniform in t) or ``--grid`` with an adaptive solver;
    other ``--steps`` than a searched solver's N. A stochastic solver whose reverse SDE is singular at the
    model's start (t = 1 of a flow-matching path) starts at :data:`AUTO_T_MAX` instead, and ``note`` says so,
    unless ``t_max`` sets the start. ``flags`` renames the flags in messages (e.g. ``{"steps": "--sample-steps"}``).
    """
    from .sampling import SAMPLERS, JumpSampler, ODESampler
    from .solvers import get_grid, get_solver

    f_steps, f_grid, f_tmax, f_solver = (_flag(n, flags) for n in ("steps", "grid", "t_max", "solver"))
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"{f_steps} must be a positive integer; got {steps!r}")
    if grid is not None and grid not in named_grids():
        raise ConfigError(f"unknown {f_grid} {grid!r}; choose one of {', '.join(named_grids())}")
    family = getattr(model, "family", type(model).__name__)
    if solver is None:
        default = model.default_sampler()
        if isinstance(default, ODESampler):
            solver = default.solver if isinstance(default.solver, str) else default.label
            grid = grid if grid is not None else (default.grid if isinstance(default.grid, str) else None)
        else:
            solver = default.name
    named = [n for n in SAMPLERS.names() if n != "ode"]
    if solver in named:
        cls = SAMPLERS.get(solver)
        if cls.name not in model.samplers():
            raise ConfigError(f"{f_solver} {solver} needs {cls.needs}; the {family!r} model samples with "
                              f"{', '.join(model.samplers())}: pick an ODE solver such as heun")
        if not getattr(cls, "takes_steps", True):  # one pass (a flow's exact / path sampler): nothing to set
            one_pass = model.get_sampler(cls.name)
            for flag, value in ((f_steps, steps), (f_grid, grid), (f_tmax, t_max)):
                if value is not None:
                    raise ConfigError(f"{flag} {value} would be ignored: the {family!r} model samples with {cls.name}, "
                                      f"{one_pass.describe()}, with no steps or times; drop " + flag)
            return ScriptSampler(one_pass, cls.name, cls.name, None, "none")
        for flag, value in ((f_grid, grid), (f_tmax, t_max)):
            if value is not None:
                other = (f"or pick a solver (e.g. {f_solver} heun)" if "ode" in model.samplers() else
                         f"(the {family!r} model takes no ODE solver)")
                raise ConfigError(f"{flag} {value} would be ignored: {cls.name} run over the model's trained range, "
                                  f"uniform in t; drop {flag} {other}")
        sampler = model.get_sampler(cls.name, steps=steps)
        kind = "learned jumps" if isinstance(sampler, JumpSampler) else cls.name
        lo_hi = model.time_range() if callable(getattr(model, "time_range", None)) else None
        return ScriptSampler(sampler, kind, cls.name, sampler.steps, "uniform in t",
                             None if lo_hi is None else (float(lo_hi[1]), float(lo_hi[0])))
    s = get_solver(solver)  # a registry name, a saved name, a folder; unknown: the error lists them
    if "ode" not in model.samplers():
        raise ConfigError(f"{f_solver} {solver}: the {family!r} model does not sample with ODE/SDE solvers; its "
                          f"samplers are {', '.join(model.samplers())}")
    label = s.name if Path(str(solver)).is_dir() else str(solver)
    kind = "SDE solver" if s.stochastic else "ODE solver"
    span = model.time_range() if callable(getattr(model, "time_range", None)) else (model.path.t_min, 1.0)
    lo, hi = (float(v) for v in span)
    own = s.default_grid()
    if own is not None:  # a solver with its own times (a searched solver): nothing else applies
        for flag, value in ((f_grid, grid), (f_tmax, t_max)):
            if value is not None:
                raise ConfigError(f"{flag} {value} would be ignored: solver {label!r} runs on its own searched times "
                                  f"(t from {float(own.times(None, model.path)[0]):g} to "
                                  f"{float(own.times(None, model.path)[-1]):g}); drop {flag}")
        if steps is not None and steps != s.default_steps:
            raise ConfigError(f"solver {label!r} was searched for {s.default_steps} steps; {f_steps} {steps} does "
                              f"not fit it: drop {f_steps} or search again for {steps} steps")
        times = own.times(None, model.path)
        return ScriptSampler(ODESampler(s, s.default_steps, own), kind, label, s.default_steps, "searched",
                             (float(times[0]), float(times[-1])))
    if not s.fixed_step:  # adaptive: only the end points count
        if grid is not None:
            raise ConfigError(f"{f_grid} {grid} would be ignored: {label} is adaptive and chooses its own steps "
                              f"between the end points; drop {f_grid} (or pick a fixed-step solver)")
        if steps is not None:
            raise ConfigError(f"{f_steps} {steps} would be ignored: {label} is adaptive and chooses its own steps; "
                              f"drop {f_steps}")
    steps = None if not s.fixed_step else (steps or s.default_steps or DEFAULT_ODE_STEPS)
    name = grid or "uniform"
    note = None
    if t_max is not None:
        if not lo < t_max <= hi:
            raise ConfigError(f"{f_tmax} {t_max} must lie in ({lo:g}, {hi:g}], the {family!r} model's time range "
                              "(t = 1 noise, t = 0 data)")
    elif s.stochastic:  # can the SDE start where the model starts? Try it on an exact field of the model's path
        try:
            _probe(model, s, get_grid(name, t_max=hi, t_min=lo), steps)
        except SolverError as e:
            if hi <= AUTO_T_MAX:
                raise
            try:
                _probe(model, s, get_grid(name, t_max=AUTO_T_MAX, t_min=lo), steps)
            except SolverError:
                raise e from None
            t_max = AUTO_T_MAX
            note = (f"{label} cannot start at t={hi:g} on the {model.path.name!r} path (its reverse SDE is singular "
                    f"there), so it starts at t={AUTO_T_MAX:g}; set {f_tmax} to choose the start")
    if t_max is None:
        return ScriptSampler(ODESampler(s, steps, name), kind, label, steps, "adaptive" if steps is None else name,
                             (hi, lo))
    return ScriptSampler(ODESampler(s, steps, get_grid(name, t_max=float(t_max), t_min=lo)), kind, label, steps,
                         "adaptive" if steps is None else name, (float(t_max), lo), note)


def _probe(model: Any, solver: Any, grid: Any, steps: int | None) -> None:
    """Run ``solver`` over ``grid`` on an exact Gaussian field of the model's path and parametrization (the start
    of an SDE is a property of the path and the times, not of the network: no network call, no conditioning)."""
    import torch

    from .analytic import Gaussian
    from .solvers import solve

    field = Gaussian(torch.zeros(1), torch.eye(1), model.path, getattr(model, "prediction", "velocity"))
    x = torch.zeros(1, 1, dtype=torch.float64)
    with torch.no_grad():
        solve(field, x, solver, max(1, solver.min_steps) if steps is not None else None, grid,
              generator=torch.Generator().manual_seed(0))


def log_lines() -> Callable[[Any, Any], None]:
    """A Trainer callback that prints one line per log step (step, loss, lr, throughput) on the main process:
    what a run without a progress bar (``--no-progress``) shows instead."""
    def callback(trainer: Any, record: Any) -> None:
        if not record.is_main_process:
            return
        from .train.records import short

        total = getattr(trainer.config, "steps", None)
        logs = "".join(f", {k} {v:.4g}" for k, v in record.logs.items() if isinstance(v, float))
        print(f"step {record.step}" + (f"/{total}" if total else "") + f": loss {record.loss:.4g}, lr "
              f"{record.lr:.3g}, {short(record.samples_per_s)} samples/s{logs}", flush=True)
    return callback


def trained_data(ckpt: Path) -> dict[str, Any] | None:
    """What the run of checkpoint folder ``ckpt`` trained on (``train_data.json`` beside it, written by
    train/train.py and train/secant.py), or None when nothing records it."""
    file = Path(ckpt).parent / "train_data.json"
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_data_matches(ckpt: Path, data: str | None, allow_other: bool) -> str:
    """``--data`` of a script that scores a checkpoint: the data its run trained on when not given; another named
    set than the run's is a ConfigError unless ``allow_other`` (``--allow-other-data``)."""
    record = trained_data(ckpt) or {}
    trained = record.get("data")
    where = Path(ckpt).parent / "train_data.json"
    if data is None:
        if trained is None:
            what = (f"its run trained on an image folder ({record['image_folder']})" if "image_folder" in record
                    else f"nothing records what it trained on ({where} is missing)")
            raise ConfigError(f"--data is needed for {ckpt}: {what}; pass --data NAME, the data set it learned")
        return str(trained)
    if trained is not None and data != trained and not allow_other:
        raise ConfigError(f"--data {data}: {ckpt} was trained on {trained!r} (per {where}); scoring it against "
                          f"{data!r} measures the wrong target. Pass --data {trained}, or --allow-other-data to "
                          f"score it against {data!r} anyway")
    if "tokens" in record and not allow_other:
        raise ConfigError(f"--data {data}: {ckpt} was trained on the token file {record['tokens']} (per {where}), "
                          f"which evaluate.py scores by default (drop --data); pass --allow-other-data to score it "
                          f"against {data!r} anyway")
    if "image_folder" in record and not allow_other:
        raise ConfigError(f"--data {data}: {ckpt} was trained on the image folder {record['image_folder']} (per "
                          f"{where}); pass --allow-other-data to score it against {data!r} anyway")
    return data


def energy_metrics(model: Any, n: int, generator: Any = None, *,
                   quadrature_points: int = 401) -> dict[str, Any]:
    """How well a model trained by an energy (``model.energy``) matches it, from ``n`` importance weights of
    ``model.sample_with_log_weights(n, generator=)``: ``log w = -U(x) - log q(x)`` for a flow with a density, the
    exact path weight ``-U(x) - log p_Z(z) + sum Delta S`` for a stochastic flow (``snf``). It reports Kish's ESS
    (and as a share of ``n``), ``log Z`` with its delta-method standard error (:func:`genkit.metrics.log_z`), and a
    reference ``log Z`` (the energy's exact one, else trapezoid quadrature of a 2-D energy on its bounds, else None)
    with the reverse KL estimate ``log Z_ref - mean(log w)`` (``KL(q || p)`` for a flow; for an snf the KL of its
    forward to its backward path measures, an upper bound of the marginals' KL)."""
    import torch

    from . import metrics
    from .energies import quadrature

    energy = model.energy
    with torch.no_grad():
        _, log_w = model.sample_with_log_weights(n, generator=generator)
    ess = metrics.effective_sample_size(log_w)
    lz, se = metrics.log_z(log_w)
    ref, how = energy.log_z, "exact"
    if ref is None and energy.dim == 2:
        ref, how = quadrature(energy, n=quadrature_points).log_z, f"quadrature ({quadrature_points}^2 trapezoid)"
    return {"energy": energy.config(), "n": n, "ess": ess, "ess_fraction": ess / n, "log_z": lz, "log_z_stderr": se,
            "log_z_reference": ref, "log_z_reference_method": how if ref is not None else None,
            "reverse_kl": None if ref is None else float(ref - log_w.double().mean())}


def table_held_out(path: str | Path, n: int, seed: int = 0, *, standardize: bool = True,
                   split_seed: int | None = None) -> tuple[Any, Any]:
    """``(reference, floor)`` of a user's table (:func:`genkit.data.load_table`), as :func:`genkit.data.held_out`
    gives for a named set with a test split: its test split, and ``min(len(test), n)`` rows of its train split
    (drawn with ``seed + 1``), the distance a perfect model would score; both with the train split's statistics
    (as they are with ``standardize=False``: samples of an energy). The split is seeded by ``split_seed``
    (default ``seed``)."""
    import torch

    from .data import load_table

    split_seed = seed if split_seed is None else split_seed
    ref = load_table(path, "test", seed=split_seed, standardize=standardize)
    train = load_table(path, "train", seed=split_seed, standardize=standardize)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:min(len(ref), n)]
    return ref, train[pick]


#: The seed of the 70/10/20 split of a file of samples of an energy (train.py --samples FILE), whatever --seed:
#: eval/evaluate.py scores the same held-out test split.
SAMPLES_SPLIT_SEED = 0


def samples_held_out(path: str | Path, dim: int, n: int, seed: int = 0) -> tuple[Any, Any]:
    """``(reference, floor)`` of a file of samples of an energy's target (train.py ``--samples FILE``, in the
    energy's own coordinates: not standardised) as :func:`table_held_out` gives them, split with
    :data:`SAMPLES_SPLIT_SEED`; a file of another dimension than ``dim`` is a ShapeError."""
    from .errors import ShapeError

    ref, floor = table_held_out(path, n, seed, standardize=False, split_seed=SAMPLES_SPLIT_SEED)
    if ref.shape[1] != dim:
        raise ShapeError(f"the samples file {path} has {ref.shape[1]} columns but the energy is {dim}-D; pass a "
                         f"file of samples [N, {dim}] of that energy's target")
    return ref, floor


def held_out_nll(model: Any, x: Any, generator: Any = None, batch_size: int = 500) -> dict[str, Any] | None:
    """The mean negative log-likelihood in nats of held-out samples ``x [n, D]`` under ``model``: exact from its
    ``log_prob`` (``model.exact_likelihood``: a normalizing flow), else from its ``nll_bound(x, generator=)``
    where it has one (an upper bound: an snf's reverse path, mdlm's ELBO), else None (no likelihood). A dict
    ``{"nats", "bits_per_dim", "stderr_nats", "n", "method"}``."""
    import math

    import torch

    if getattr(model, "exact_likelihood", False):
        values, how = (lambda b: -model.log_prob(b)), "exact (change of variables)"
    elif callable(getattr(model, "nll_bound", None)):
        values, how = (lambda b: model.nll_bound(b, generator=generator)), "upper bound (nll_bound)"
    else:
        return None
    with torch.no_grad():
        nll = torch.cat([values(b).detach().double().cpu() for b in x.split(batch_size)])
    nats = float(nll.mean())
    dim = math.prod(x.shape[1:])
    return {"nats": nats, "bits_per_dim": nats / (dim * math.log(2)),
            "stderr_nats": float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else None, "n": len(nll),
            "method": how}


def tokens_held_out(path: str | Path, n: int, seed: int = 0, alphabet: str | None = None,
                    holdout: float | None = None) -> tuple[Any, Any]:
    """``(reference, floor)`` of a user's token file (:func:`genkit.data.load_tokens`, as train.py --tokens reads
    it), as :func:`table_held_out` gives for a table: its held-out test split, and ``min(len(test), n)``
    sequences of its train split (drawn with ``seed + 1``), the statistics a perfect model would score."""
    import torch

    from .data.sequences import TOKEN_HOLDOUT, load_tokens

    holdout = TOKEN_HOLDOUT if holdout is None else holdout
    ref, _ = load_tokens(path, alphabet, split="test", holdout=holdout)
    train, _ = load_tokens(path, alphabet, split="train", holdout=holdout)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:min(len(ref), n)]
    return ref, train[pick]


def check_method(args: Any, method_flags: dict[str, tuple[str, ...]]) -> None:
    """A script's ``--method`` must be one of ``method_flags`` (method -> its own flags' argparse dests), and a
    flag of another method (not the chosen one's too) given a value is a ConfigError naming the methods it is for."""
    if args.method not in method_flags:
        raise ConfigError(f"unknown --method {args.method!r}; choose one of {', '.join(method_flags)}")
    for dests in method_flags.values():
        for dest in dests:
            if dest not in method_flags[args.method] and getattr(args, dest) is not None:
                flag = "--" + dest.replace("_", "-")
                takes = [m for m, d in method_flags.items() if dest in d]
                names = takes[0] if len(takes) == 1 else ", ".join(takes[:-1]) + " or " + takes[-1]
                raise ConfigError(f"{flag} {getattr(args, dest)} does not apply to --method {args.method}; drop "
                                  f"{flag} or use --method {names}")


def step_list(text: str, flag: str = "step counts") -> tuple[int, ...]:
    """``"1,2,4"`` as ``(1, 2, 4)``: comma-separated positive integers, else a ConfigError naming ``flag``.

    >>> step_list("1,2,4")
    (1, 2, 4)
    """
    try:
        steps = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated positive integers like 1,2,4; got {text!r}") from None
    if not steps or min(steps) < 1:
        raise ConfigError(f"{flag} must be positive integers; got {text!r}")
    return steps


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (``model_index.json``, or ``unet/`` and ``scheduler/``)."""
    p = Path(path)
    return (p / "model_index.json").is_file() or ((p / "unet").is_dir() and (p / "scheduler").is_dir())


def load_teacher(path: str | Path, device: Any = "cpu") -> Any:
    """The frozen teacher of a distillation script: a genkit checkpoint folder (or a train.py run folder holding
    ``checkpoint/``), loaded with its EMA weights, or a diffusers pipeline folder through
    :func:`genkit.from_diffusers`. It must be a multi-step field with a sample shape (flow matching or
    diffusion); anything else is a ConfigError naming what it holds."""
    from . import checkpoint
    from .fields import check_field
    from .interop import from_diffusers
    from .loading import load
    from .sampling import ODESampler

    p = Path(path)
    if is_diffusers_folder(p):
        teacher = from_diffusers(p).to(device)
    else:
        p = checkpoint_dir(p)
        if not p.is_dir():
            raise ConfigError(f"--teacher {path}: no such folder; pass a genkit checkpoint (or train.py run folder) "
                              "or a diffusers pipeline folder")
        teacher = load(p, map_location=device)
        family = checkpoint.read_config(p).get("family")
        default = teacher.default_sampler() if callable(getattr(teacher, "default_sampler", None)) else None
        if not hasattr(teacher, "sample_shape") or not isinstance(default, ODESampler):
            raise ConfigError(f"{p} holds a {family!r} model, not a multi-step flow-matching or diffusion field; "
                              "pass a checkpoint of either (or a diffusers pipeline folder)")
    check_field(teacher)
    return teacher


class TeacherSamples:
    """A batch source: each step's batch is ``batch_size`` fresh samples of ``teacher`` (``solver`` x ``steps``),
    drawn with the trainer's generator, seeded from (seed, step, rank) alone: resume and multi-process exact."""

    def __init__(self, teacher: Any, batch_size: int, solver: str, steps: int):
        self.teacher, self.batch_size, self.solver, self.steps = teacher, batch_size, solver, steps

    def batch(self, step: int, rank: int, generator: Any) -> Any:
        import torch

        with torch.no_grad():
            return self.teacher.sample(self.batch_size, solver=self.solver, steps=self.steps, generator=generator,
                                       device=generator.device)


def sample_distances(x: Any, ref: Any, features: Callable | None, seed: int) -> dict[str, float]:
    """The sample-quality numbers eval/evaluate.py reports: the Frechet distance in ``features`` (digits: the
    digits classifier's) for images, else sliced W2, energy distance and MMD (vectors)."""
    import torch

    from . import metrics

    if features is not None:
        return {"frechet_digits": metrics.fid(x.clamp(-1, 1), ref, features)}
    return {"sliced_w2": metrics.sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(seed)),
            "energy_distance": metrics.energy_distance(x, ref), "mmd": metrics.mmd(x, ref)}


def digits_features() -> Callable:
    """The features of genkit's small digits classifier (trained on the train split, seed 0), in which the
    digits Frechet distance is measured."""
    import torch

    from . import metrics
    from .data import digits, digits_labels

    classifier = metrics.train_digits_classifier(digits("train"), digits_labels("train"),
                                                 generator=torch.Generator().manual_seed(0))
    return classifier.features


class ScriptParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one ``error: ... (see --help)`` line and status 2, like every
    other bad input of a script."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keep the description's line breaks and show defaults, but not the None / False placeholders of flags whose
    default depends on others (nor a second default where the help states one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def save_picture(model: Any, samples: Any, path: str | Path, *, reference: Any = None, title: str | None = None
                 ) -> Path:
    """The scripts' picture of ``samples``: the family's own where it draws one (``model.picture(samples)``
    returns heatmaps, e.g. a 2-D hypergrid GFlowNet's samples beside its exact and target distributions), else
    :func:`genkit.plotting.save_samples_png` (beside ``reference``)."""
    from .plotting import save_heatmaps_png, save_samples_png

    panels = model.picture(samples) if callable(getattr(model, "picture", None)) else None
    if panels is not None:
        return save_heatmaps_png(panels, path, title=title)
    x = samples.float() if samples.is_floating_point() else samples
    return save_samples_png(x, path, reference=reference, title=title)


def target_summary(report: dict[str, Any]) -> str:
    """One line of a ``target_report`` (a GFlowNet's): its exact L1 / JSD / log Z on an enumerable environment,
    else its reward statistics."""
    if "l1_exact_sum" in report:
        return (f"exact L1 {report['l1_exact_sum']:.4g} (sum; mean {report['l1_exact_mean']:.3g}), JSD "
                f"{report['jsd_exact']:.3g}, log Z {report['log_z_learned']:.4f} (exact {report['log_z_exact']:.4f})"
                + (f", {report['modes_in_samples']} of {report['modes_total']} modes in the samples"
                   if "modes_in_samples" in report else ""))
    if "mean_log_reward" in report:
        return (f"mean log R {report['mean_log_reward']:.4g}, unique {report['unique_fraction']:.3f}"
                + (f", {report['modes_in_samples']} modes in the samples" if "modes_in_samples" in report else ""))
    return "no exact evaluation"
