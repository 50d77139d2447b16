"""One-step models against their flow-matching teacher (issue 11): 1- and 2-NFE quality of MeanFlow, Modular
MeanFlow, SMT and SMD (and MeanFlow distilled) against flow matching at 1, 2, 4 and 50 NFE, same network, one run.

Per set (``--sets``, default ``moons,digits``) and training seed (``--seeds``, the tables show medians), every
contender is the same MLP (``--hidden`` x ``--depth``, on the flattened 8x8 digits for ``digits``) trained through
genkit's ``Trainer`` with the same ``TrainConfig`` (AdamW, ``--lr``, cosine schedule, EMA 0.999, clipping 1, batch
``--batch-size``) and each family's library defaults; the budget is ``B = --steps`` optimizer steps:

- ``flow_matching`` (the teacher): ``FlowMatching``, B steps.
- ``meanflow``: ``MeanFlow`` from scratch, B steps (every MeanFlow contender's MLP has ``max_freq=5``, the
  smooth time features of ``MeanFlow.net_options``, what ``train/train.py --family meanflow`` builds).
- ``modular_meanflow``: ``MeanFlow(modulation=1, modulation_warmup=B * --modulation-warmup-frac)``, B steps.
- ``smt``: ``SMT`` from scratch, B *generator* updates: ``warmup_steps = B * --smt-warmup-frac`` denoising
  warm-up steps, then (B - warm-up) SMT generator updates, each after ``score_updates`` (5, the default) score
  updates: the trainer runs ``warm-up + 6 (B - warm-up)`` steps; their count, wall time and network
  evaluations are reported.
- ``smd``: ``SMD.from_teacher(teacher)`` (data-free: real = teacher samples, the default), ``B * --distill-frac``
  generator updates (again each after 5 score updates).
- ``meanflow_distilled``: ``MeanFlow.from_teacher(teacher, net=...)`` (a fresh MLP with ``max_freq=5``,
  not the teacher's weights, whose time features reach 1000) on the data, ``B * --distill-frac`` steps.

Quality (the EMA weights, as ``genkit.load`` gives them): one-step models at 1 and 2 NFE
(``model.sample(n, steps=k)``: k learned jumps; the score-of-mixture models also with the restart sampler at 2);
the teacher at 1, 2, 4 and 50 NFE with every fixed-step genkit solver that spends exactly that many evaluations
(euler, ddim, dpmpp_2m, dpmpp_3m, unipc, deis, midpoint, heun, rk4; and edm, EDM's stochastic Heun sampler with
its default churn 10), the best one (lowest median) reported per NFE (a choice made on the evaluation metric
itself: it favours the teacher). Metrics: ``moons`` sliced W2 (256 fixed projections, also the energy distance)
of ``--n`` samples to a held-out draw; ``digits`` the Frechet
distance in the digits classifier's features (``genkit.metrics.train_digits_classifier``) to the test split,
from as many samples as the noise floor has. Noise floor: a second held-out draw (``genkit.data.held_out``; the
median of ``--floor-draws`` draws).

Targets (issue 11): every one-step model's 1-NFE metric <= 1.2x the teacher's 50-NFE one; its 2-NFE metric
below the teacher's 2-NFE one; MeanFlow's median time per training step <= 2x flow matching's (peak memory
reported); on digits, the distilled models (``B / 4`` steps) meeting the 1.2x target. Time per step: the median
of ``--log-every``-step windows after the first (the trainer's callbacks, same process, same thread count).
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak of the resident set (polled every
2 ms) above its value before a ``--memory-steps``-step fit of each contender in a fresh (spawned) process.

    python eval/bench_onestep.py              # ~25 min on one thread of a shared 2-core machine
    python eval/bench_onestep.py --quick      # tiny, about a minute, to a temporary folder, no memory probe
    python eval/bench_onestep.py --device cuda --steps 20000 --hidden 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, markdown_table, median, write_results  # noqa: E402

import genkit  # noqa: E402
from genkit import metrics  # noqa: E402
from genkit.data import digits, digits_labels, held_out, load_dataset  # noqa: E402
from genkit.models import SMD, SMT, FlowMatching, MeanFlow  # noqa: E402
from genkit.nets import MLP  # noqa: E402
from genkit.train import TrainConfig, Trainer  # noqa: E402

ONE_STEP = ("meanflow", "modular_meanflow", "smt", "smd", "meanflow_distilled")
DISTILLED = ("smd", "meanflow_distilled")
TEACHER_NFE = (1, 2, 4, 50)
# genkit's fixed-step solvers (edm: EDM's stochastic sampler, its last step an Euler one); steps per NFE probed
SOLVERS = ("euler", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "midpoint", "heun", "rk4", "edm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="moons,digits", help="comma separated: moons (or another 2-D toy set), digits")
    p.add_argument("--steps", type=int, default=1200, help="training budget B (optimizer / generator steps)")
    p.add_argument("--seeds", type=int, default=2, help="training seeds 0..k-1 (the tables show medians)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128, help="MLP width (every contender)")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--lr", type=float, default=1e-3, help="TrainConfig.lr (SMT / SMD: the generator's; score 5x)")
    p.add_argument("--smt-warmup-frac", type=float, default=0.25, help="share of SMT's B generator steps spent "
                                                                        "in its denoising warm-up")
    p.add_argument("--modulation-warmup-frac", type=float, default=0.5, help="Modular MeanFlow's lambda warm-up "
                                                                               "as a share of B")
    p.add_argument("--distill-frac", type=float, default=0.25, help="distillation budget as a share of B")
    p.add_argument("--n", type=int, default=2000, help="samples per evaluation (2-D sets; digits: the floor's)")
    p.add_argument("--floor-draws", type=int, default=3, help="held-out draws the noise floor is the median of")
    p.add_argument("--log-every", type=int, default=50, help="steps per timing window")
    p.add_argument("--memory-steps", type=int, default=40, help="CPU: steps of each contender's memory probe "
                                                                 "(a fresh process; 0: no probe)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny run to a temporary folder (tests the script)")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS}; --quick: a temporary one)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.hidden, args.depth, args.n, args.floor_draws, args.log_every = 48, 32, 1, 300, 2, 8
        args.memory_steps = 0  # the memory probe spawns 6 processes per set: a minute on its own
    return args


# --- measuring a training run ----------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _probe(queue: Any, name: str, contender: str, args: argparse.Namespace) -> None:
    """Child process of :func:`memory_probe`: build the contender (a distiller on an untrained teacher) and train
    it ``--memory-steps`` steps; report the peak of the resident set during ``fit`` above its value before
    (polled every 2 ms; ``ru_maxrss`` cannot be used: the imports' peak is above a small net's training)."""
    torch.set_num_threads(args.threads)
    data = (load_dataset("digits", split="train").flatten(1) if name == "digits" else
            load_dataset(name, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    teacher = FlowMatching(MLP(data.shape[1], hidden=args.hidden, depth=args.depth), sample_shape=(data.shape[1],))
    model, _, _ = build(contender, teacher, data.shape[1], args)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(steps=args.memory_steps, batch_size=args.batch_size, lr=args.lr, out_dir=tmp,
                          log_every=args.memory_steps, checkpoint_every=None, progress=False, cpu=True)
        trainer = Trainer(model, cfg)
        before = peak = _rss_mb()
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.wait(0.002):
                peak = max(peak, _rss_mb())

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        trainer.fit(None if getattr(model, "data_free", False) else data)
        done.set()
        thread.join()
        queue.put(max(peak, _rss_mb()) - before)


def memory_probe(name: str, contender: str, args: argparse.Namespace) -> float | None:
    """CPU peak memory of a training run, in a fresh process (no memory cached by earlier runs)."""
    import multiprocessing as mp

    if args.memory_steps <= 0:
        return None
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_probe, args=(queue, name, contender, args))
    proc.start()
    try:
        return float(queue.get(timeout=600))
    finally:
        proc.join()


def networks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The networks whose forward passes a training step pays for: the model's, its score / fake-score net and
    a frozen teacher's."""
    nets = [getattr(model, k) for k in ("net", "score_net", "fake_net") if getattr(model, k, None) is not None]
    frozen = getattr(model, "frozen", None)
    teacher = frozen.get("teacher") if frozen is not None else None
    if teacher is not None and getattr(teacher, "net", None) is not None:
        nets.append(teacher.net)
    return nets


def train(model: torch.nn.Module, data: torch.Tensor | None, steps: int, out: Path, args: argparse.Namespace,
          seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train through genkit's Trainer; the EMA model (``genkit.load``) and the run's measurements."""
    device = torch.device(args.device)
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=seed, out_dir=str(out),
                      log_every=args.log_every, checkpoint_every=None, progress=False, cpu=device.type == "cpu")
    calls = [0]
    nets = networks(model)
    hooks = [net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for net in nets]
    # a net's own one-pass JVP (TwoTimeMLP.forward_jvp: output and tangent) bypasses the forward hooks: count it
    # as one call, patched on the class for the run (an instance attribute would follow the net into copies)
    jvp_classes = {type(net) for net in nets if callable(getattr(type(net), "forward_jvp", None))}
    originals = {cls: cls.forward_jvp for cls in jvp_classes}
    ids = {id(net) for net in nets}

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward_jvp(self: torch.nn.Module, *a: Any, **k: Any) -> Any:
            if id(self) in ids:
                calls[0] += 1
            return original(self, *a, **k)
        return forward_jvp

    for cls in jvp_classes:
        cls.forward_jvp = counted(originals[cls])
    clock: list[float] = []
    trainer = Trainer(model, cfg, callbacks=[lambda _t, _r: clock.append(time.perf_counter())])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        result = trainer.fit(data)
    finally:
        for cls, original in originals.items():
            cls.forward_jvp = original
    wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    starts = [t0, *clock]
    window_ms = [1e3 * (b - a) / args.log_every for a, b in zip(starts[:-1], starts[1:])][1:-1] or \
        [1e3 * wall / steps]  # drop the warm-up window and the last (it holds the checkpoint write)
    stats = {"trainer_steps": steps, "wall_s": wall, "ms_per_step_median": median(window_ms),
             "ms_per_step_windows": window_ms, "network_forwards_per_step": calls[0] / steps,
             "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
             "final_loss": result.losses[-1][1] if result.losses else None}
    return genkit.load(out, map_location=args.device), stats


# --- the contenders ------------------------------------------------------------------------------------------
def build(name: str, teacher: torch.nn.Module | None, dim: int, args: argparse.Namespace) -> tuple[Any, int, int]:
    """``(model, trainer steps, generator steps)`` of contender ``name``."""
    b = args.steps
    net = MLP(dim, hidden=args.hidden, depth=args.depth)
    shape = (dim,)
    if name == "flow_matching":
        return FlowMatching(net, sample_shape=shape), b, b
    if name in ("meanflow", "modular_meanflow", "meanflow_distilled"):  # smooth time features (max_freq 5)
        net = MLP(dim, hidden=args.hidden, depth=args.depth, **MeanFlow.net_options(args, "mlp"))
    if name == "meanflow":
        return MeanFlow(net, sample_shape=shape), b, b
    if name == "modular_meanflow":
        return MeanFlow(net, sample_shape=shape, modulation=1.0,
                        modulation_warmup=int(b * args.modulation_warmup_frac)), b, b
    if name == "smt":
        warm = int(b * args.smt_warmup_frac)
        model = SMT(net, sample_shape=shape, warmup_steps=warm)
        return model, warm + (model.score_updates + 1) * (b - warm), b
    k = max(1, int(b * args.distill_frac))
    if name == "smd":
        model = SMD.from_teacher(teacher, batch_size=args.batch_size)
        return model, (model.score_updates + 1) * k, k
    if name == "meanflow_distilled":
        return MeanFlow.from_teacher(teacher, net=net), k, k
    raise ValueError(name)


# --- the metric ------------------------------------------------------------------------------------------------
class SetUp:
    """A data set: training data (flattened), the metric against the held-out reference and its noise floor."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        if name == "digits":
            self.train_data = load_dataset("digits", split="train").flatten(1)
            ref, floor = held_out("digits", args.n)
            self.clf = metrics.train_digits_classifier(digits("train"), digits_labels("train"),
                                                       generator=torch.Generator().manual_seed(0))
            self.ref, self.n = ref, len(floor)
            floors = [floor] + [load_dataset("digits", n=len(floor), generator=torch.Generator().manual_seed(2 + k))
                                for k in range(args.floor_draws - 1)]
            self.metric_name = "Frechet distance (digits classifier features)"
        else:
            self.train_data = load_dataset(name, generator=torch.Generator().manual_seed(0))
            ref, floor = held_out(name, args.n)
            self.ref, self.n = ref, args.n
            floors = [floor] + [load_dataset(name, n=args.n, generator=torch.Generator().manual_seed(2000 + k))
                                for k in range(args.floor_draws - 1)]
            self.metric_name = "sliced W2 (256 projections)"
        self.dim = self.train_data.shape[1]
        self.floor_draws = [self.metric(f)["metric"] for f in floors]
        self.floor = median(self.floor_draws)

    def metric(self, x: torch.Tensor) -> dict[str, float]:
        x = x.detach().float().cpu()
        if not torch.isfinite(x).all():
            return {"metric": float("inf")}
        if self.name == "digits":
            images = x.reshape(-1, 1, 8, 8).clamp(-1, 1)[: self.n]
            with torch.no_grad():
                return {"metric": metrics.fid(images, self.ref, self.clf.features)}
        sw = metrics.sliced_wasserstein(x, self.ref, n_projections=256, generator=torch.Generator().manual_seed(0))
        return {"metric": sw, "energy_distance": metrics.energy_distance(x, self.ref)}


def teacher_candidates(model: Any, nfe: int, device: str) -> list[tuple[str, int]]:
    """``(solver, steps)`` pairs that cost exactly ``nfe`` network evaluations (probed on 2 samples)."""
    out = []
    for solver in SOLVERS:
        for steps in sorted({nfe, nfe // 2, nfe // 4, nfe // 2 + 1} - {0}):
            sol = model.sample(2, solver=solver, steps=steps, return_solution=True, device=device)
            if sol.nfe == nfe:
                out.append((solver, steps))
                break
    return out


def evaluate(name: str, model: Any, setup: SetUp, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    def gen() -> torch.Generator:
        return torch.Generator(device=args.device).manual_seed(1000 + seed)  # the same noise for every contender

    def score(draw: Callable[[], torch.Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        x = draw()
        return {**setup.metric(x), "sample_s": time.perf_counter() - t0}

    n = setup.n
    res: dict[str, Any] = {}
    if name == "flow_matching":
        for nfe in TEACHER_NFE:
            res[str(nfe)] = {f"{s}x{k}": score(lambda s=s, k=k: model.sample(n, solver=s, steps=k, generator=gen()))
                             for s, k in teacher_candidates(model, nfe, args.device)}
        return res
    for k in (1, 2):
        res[str(k)] = {"jumps": score(lambda k=k: model.sample(n, steps=k, generator=gen()))}
    if "restart" in model.samplers():
        res["2"]["restart"] = score(lambda: model.sample(n, sampler="restart", steps=2, generator=gen()))
    return res


# --- one set ----------------------------------------------------------------------------------------------------
def run_set(name: str, args: argparse.Namespace) -> dict[str, Any]:
    setup = SetUp(name, args)
    print(f"[{name}] {setup.metric_name}; noise floor {setup.floor:.4g} (draws {setup.floor_draws})", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in ("flow_matching", *ONE_STEP)}
    for seed in range(args.seeds):
        others = list(ONE_STEP[seed % len(ONE_STEP):] + ONE_STEP[:seed % len(ONE_STEP)])  # rotate the order
        with tempfile.TemporaryDirectory() as tmp:
            teacher = None
            for c in ["flow_matching", *others]:
                torch.manual_seed(seed)
                model, steps, gen_steps = build(c, teacher, setup.dim, args)
                data = None if getattr(model, "data_free", False) else setup.train_data
                trained, stats = train(model, data, steps, Path(tmp) / c, args, seed)
                stats.update(generator_steps=gen_steps, ms_per_generator_step=1e3 * stats["wall_s"] / gen_steps)
                if c == "flow_matching":
                    teacher = trained
                quality = evaluate(c, trained, setup, args, seed)
                runs[c].append({"seed": seed, "train": stats, "quality": quality})
                best = {nfe: min(v.items(), key=lambda kv: kv[1]["metric"]) for nfe, v in quality.items()}
                print(f"[{name}] seed {seed} {c}: {steps} trainer steps in {stats['wall_s']:.0f} s "
                      f"({stats['ms_per_step_median']:.1f} ms/step), "
                      + ", ".join(f"{nfe} NFE {v[1]['metric']:.4g} ({v[0]})" for nfe, v in best.items()), flush=True)
    if args.device == "cpu":  # peak memory from a fresh process per contender (the same for every seed)
        for c, rs in runs.items():
            mb = memory_probe(name, c, args)
            for r in rs:
                r["train"]["peak_memory_mb"] = mb
            print(f"[{name}] {c}: peak memory {mb} MB", flush=True)
    return {"setup": {"metric": setup.metric_name, "noise_floor": setup.floor, "noise_floor_draws": setup.floor_draws,
                      "samples_per_evaluation": setup.n, "dim": setup.dim, "train_size": len(setup.train_data)},
            "runs": runs, "summary": summarise(runs, setup.floor, name)}


def _med(runs: list[dict[str, Any]], nfe: str, key: str) -> float:
    return median([r["quality"][nfe][key]["metric"] for r in runs])


def summarise(runs: dict[str, list[dict[str, Any]]], floor: float, name: str) -> dict[str, Any]:
    fm = runs["flow_matching"]
    teacher: dict[str, Any] = {}
    for nfe in map(str, TEACHER_NFE):
        by_solver = {s: _med(fm, nfe, s) for s in fm[0]["quality"][nfe]}
        best = min(by_solver, key=by_solver.get)
        teacher[nfe] = {"metric": by_solver[best], "solver": best, "by_solver": by_solver}
    t50, t2 = teacher["50"]["metric"], teacher["2"]["metric"]
    fm_ms = median([r["train"]["ms_per_step_median"] for r in fm])
    out: dict[str, Any] = {"teacher": teacher, "contenders": {}}
    for c in ("flow_matching", *ONE_STEP):
        r = runs[c]
        train_stats = {k: median([x["train"][k] for x in r]) for k in
                       ("trainer_steps", "generator_steps", "wall_s", "ms_per_step_median", "ms_per_generator_step",
                        "network_forwards_per_step")}
        mem = [x["train"]["peak_memory_mb"] for x in r]
        train_stats["peak_memory_mb"] = None if None in mem else median(mem)
        train_stats["time_per_step_ratio_to_flow_matching"] = median(
            [x["train"]["ms_per_step_median"] / y["train"]["ms_per_step_median"] for x, y in zip(r, fm)])
        fm_mem = [y["train"]["peak_memory_mb"] for y in fm]
        train_stats["peak_memory_ratio_to_flow_matching"] = (
            None if None in mem or None in fm_mem or min(fm_mem) <= 0 else
            median([a / b for a, b in zip(mem, fm_mem)]))
        entry: dict[str, Any] = {"train": train_stats}
        if c != "flow_matching":
            m1, m2 = _med(r, "1", "jumps"), _med(r, "2", "jumps")
            entry.update(metric_1nfe=m1, metric_2nfe=m2, ratio_1nfe_to_teacher_50=m1 / t50,
                         ratio_2nfe_to_teacher_50=m2 / t50, ratio_1nfe_to_teacher_2=m1 / t2,
                         ratio_2nfe_to_teacher_2=m2 / t2, over_floor_1nfe=m1 / floor,
                         target_within_1p2x_teacher_50=m1 <= 1.2 * t50, target_2nfe_beats_teacher_2nfe=m2 < t2)
            if "restart" in r[0]["quality"]["2"]:
                entry["metric_2nfe_restart"] = _med(r, "2", "restart")
        out["contenders"][c] = entry
    cs = out["contenders"]
    targets = {
        "every_one_step_within_1p2x_teacher_50nfe": all(cs[c]["target_within_1p2x_teacher_50"] for c in ONE_STEP),
        "every_one_step_2nfe_beats_teacher_2nfe": all(cs[c]["target_2nfe_beats_teacher_2nfe"] for c in ONE_STEP),
        "meanflow_time_per_step_within_2x_flow_matching":
            cs["meanflow"]["train"]["time_per_step_ratio_to_flow_matching"] <= 2.0,
    }
    if name == "digits":
        targets["distilled_in_quarter_budget_within_1p2x_teacher_50nfe"] = all(
            cs[c]["target_within_1p2x_teacher_50"] for c in DISTILLED)
    out["targets"] = targets
    out["flow_matching_ms_per_step"] = fm_ms
    return out


# --- report -----------------------------------------------------------------------------------------------------
TARGETS = {"every_one_step_within_1p2x_teacher_50nfe": "every one-step model at 1 NFE <= 1.2x the teacher at 50 NFE",
           "every_one_step_2nfe_beats_teacher_2nfe": "every one-step model at 2 NFE below the teacher at 2 NFE",
           "meanflow_time_per_step_within_2x_flow_matching": "MeanFlow time per step <= 2x flow matching's",
           "distilled_in_quarter_budget_within_1p2x_teacher_50nfe": "distilled in B/4 steps (SMD, MeanFlow) at 1 NFE "
                                                                    "<= 1.2x the teacher at 50 NFE"}


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def report(sets: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    b, k = args.steps, max(1, int(args.steps * args.distill_frac))
    md = [f"One-step models against their flow-matching teacher (issue 11), {args.seeds} training seeds (medians). "
          f"Every contender is genkit's MLP {args.hidden} x {args.depth} (on the flattened 8x8 digits for digits: "
          f"the digits UNet's MeanFlow / SMD steps cost 0.7 / 2.5 s on this CPU), batch {args.batch_size}, lr "
          f"{args.lr:g} (SMT / SMD score networks 5x), EMA 0.999, the families' library defaults otherwise. Budget "
          f"B = {b}: flow matching, MeanFlow and Modular MeanFlow (lambda = 1, linear warm-up over "
          f"{int(b * args.modulation_warmup_frac)} steps) B steps; SMT B generator steps "
          f"({int(b * args.smt_warmup_frac)} of them its denoising warm-up, each later one after 5 score updates); "
          f"SMD (data-free, from the teacher) and MeanFlow distilled (from the teacher, on the data) {k} = B/4 "
          "generator steps (SMD: after 5 score updates each). One-step models sample with k learned jumps "
          "(`model.sample(n, steps=k)`); the teacher's row at each NFE is the best of genkit's fixed-step "
          "solvers spending exactly that many evaluations (ODE solvers and EDM's stochastic sampler; every "
          f"solver's number is in the JSON). Whole run: {wall / 60:.1f} min.\n"]
    for name, res in sets.items():
        s, setup = res["summary"], res["setup"]
        t = s["teacher"]
        md.append(f"\n## {name}: {setup['metric']}, {setup['samples_per_evaluation']} samples, noise floor "
                  f"{setup['noise_floor']:.4g} (median of {len(setup['noise_floor_draws'])} held-out draws: "
                  + ", ".join(f"{v:.3g}" for v in setup["noise_floor_draws"]) + ")\n")
        md.append("Teacher (flow matching, B steps): " + "; ".join(
            f"{nfe} NFE {t[nfe]['metric']:.4g} ({t[nfe]['solver']})" for nfe in map(str, TEACHER_NFE))
                  + f"; at 50 NFE {t['50']['metric'] / setup['noise_floor']:.1f}x the noise floor.\n")
        rows = []
        for c in ONE_STEP:
            e = s["contenders"][c]
            restart = f" (restart {e['metric_2nfe_restart']:.4g})" if "metric_2nfe_restart" in e else ""
            rows.append([c, f"{e['metric_1nfe']:.4g}", f"{e['metric_2nfe']:.4g}{restart}",
                         f"{e['ratio_1nfe_to_teacher_50']:.2f}", f"{e['ratio_2nfe_to_teacher_50']:.2f}",
                         f"{e['ratio_1nfe_to_teacher_2']:.2f}", f"{e['ratio_2nfe_to_teacher_2']:.2f}",
                         f"{e['over_floor_1nfe']:.2f}", verdict(e["target_within_1p2x_teacher_50"]),
                         verdict(e["target_2nfe_beats_teacher_2nfe"])])
        md.append(markdown_table(["model", "1 NFE", "2 NFE", "1 NFE / T50", "2 NFE / T50", "1 NFE / T2",
                                  "2 NFE / T2", "1 NFE / floor", "<= 1.2x T50 (1 NFE)", "< T2 (2 NFE)"], rows))
        rows = []
        for c in ("flow_matching", *ONE_STEP):
            tr = s["contenders"][c]["train"]
            rows.append([c, int(tr["trainer_steps"]), int(tr["generator_steps"]), f"{tr['wall_s']:.0f}",
                         f"{tr['ms_per_step_median']:.1f}", f"{tr['time_per_step_ratio_to_flow_matching']:.2f}",
                         f"{tr['ms_per_generator_step']:.1f}", f"{tr['network_forwards_per_step']:.1f}",
                         "n/a" if tr["peak_memory_mb"] is None else f"{tr['peak_memory_mb']:.1f}",
                         "n/a" if tr["peak_memory_ratio_to_flow_matching"] is None
                         else f"{tr['peak_memory_ratio_to_flow_matching']:.2f}"])
        md.append("\nTraining (T50 / T2: the teacher's best 50- / 2-NFE metric):\n\n" + markdown_table(
            ["model", "trainer steps", "generator steps", "wall s", "ms / step", "ms / step vs FM",
             "wall ms / generator step", "net forwards / step", "peak memory MB", "memory vs FM"], rows))
        md.append("\nTargets: " + "; ".join(f"{TARGETS[k]}: **{verdict(v)}**" for k, v in s["targets"].items())
                  + ".\n")
    md.append("\nPeak memory: " + ("`torch.cuda.max_memory_allocated` per run." if args.device == "cuda" else
              f"on the CPU, the peak of the resident set (polled every 2 ms) above its value before a "
              f"{args.memory_steps}-step `Trainer.fit` of each contender in a fresh process (distillers on an "
              "untrained teacher of the same size): the memory a run adds above the process's imports, data and "
              "model; rough at this network size (allocator granularity).")
              + " Network forwards count every network call (a JVP as one, and the two-time MLP's one-pass "
              "forward_jvp, output and tangent together, as one; a teacher's sampling steps included), "
              "so SMD's data-free score updates show the teacher's 16-step heun samples (32 calls). A miss is a miss "
              "at this CPU budget: nothing was tuned per family.")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sets = {name: run_set(name, args) for name in args.sets.split(",")}
    wall = time.perf_counter() - t0
    settings = {k: getattr(args, k) for k in ("sets", "steps", "seeds", "batch_size", "hidden", "depth", "lr",
                                               "smt_warmup_frac", "modulation_warmup_frac", "distill_frac", "n",
                                               "floor_draws", "log_every", "memory_steps", "threads", "device",
                                               "quick")}
    settings.update(net="genkit.nets.MLP (two-time copy for MeanFlow), flattened digits", teacher_solvers=SOLVERS,
                    teacher_nfe=TEACHER_NFE, ema_decay=0.999, grad_clip=1.0, schedule="cosine to 0")
    payload = {"settings": settings, "wall_s": wall, "sets": sets}
    md = report(sets, args, wall)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else (Path(tmp) if args.quick else RESULTS)
        json_path, md_path = write_results("bench_onestep", payload, md, out)
        print(md)
        print(f"wrote {json_path}, {md_path} in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
