"""Flow-matching training speed: genkit's ``Trainer`` + ``FlowMatching`` against the training loop a torchcfm
user writes around ``ConditionalFlowMatcher(sigma=0.0)``.

Both sides train the same network (``genkit.nets.MLP``), on the same data (moons), with the same batch size,
the same optimizer (AdamW, same lr, no weight decay) and the same number of steps, in one process, with the
contenders interleaved (the order rotates every repeat). The time per step is measured over the steps after
a warm-up window (genkit: between two of its log callbacks) and excludes set-up and genkit's final
checkpoint write. Both process CPU time and wall-clock time are recorded.

Rows (what differs is spelled out in the results file):

- ``full``: genkit's defaults (EMA 0.999 with warm-up, grad clipping at 1.0, cosine LR schedule, finiteness
  checks, per-step derived seeds, a metrics.jsonl line every ``--warmup`` steps) against the recipe of torchcfm's
  ``examples/images/cifar10/train_cifar10.py`` (``clip_grad_norm_(1.0)``, ``LambdaLR``, its ``ema()``
  helper from ``utils_cifar.py``), here with the same LR schedule function as genkit.
- ``bare``: genkit with ``ema_decay=None, grad_clip=None`` and a constant LR (its finiteness checks, grad-norm
  logging and per-step seeding stay: they cannot be switched off) against the minimal torchcfm loop.
- AdamW implementation: genkit's trainer runs AdamW fused (one kernel; torch >= 2.4 on CPU, any on CUDA,
  not under fp16). A torchcfm user gets torch's default (a per-parameter loop on CPU). The extra rows
  ``genkit (default AdamW)`` and ``torchcfm (fused AdamW)`` separate the optimizer kernel from the
  trainer's own overhead.

Short runs, many repeats: on a shared machine the load drifts over seconds, so each contender runs
``--warmup + --timed`` steps per repeat and the ratio of two contenders is taken within each repeat.

Usage: ``python eval/bench_fm_training.py [--repeats 15 --warmup 10 --timed 30 --threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, median, write_results  # noqa: E402

import genkit.train as gtrain  # noqa: E402
import genkit.train.optim as goptim  # noqa: E402
from genkit.data import load_dataset  # noqa: E402
from genkit.models import FlowMatching  # noqa: E402
from genkit.nets import MLP  # noqa: E402


def lr_factor(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """genkit's schedule (linear warm-up, cosine to ``floor``), so the torchcfm loop's LambdaLR does the same work."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        progress = min(1.0, (k + 1 - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def cifar10_ema(source: torch.nn.Module, target: torch.nn.Module, decay: float) -> None:
    """The EMA of torchcfm's CIFAR-10 example (``utils_cifar.ema``), as its users run it."""
    source_dict, target_dict = source.state_dict(), target.state_dict()
    for key in source_dict.keys():
        target_dict[key].data.copy_(target_dict[key].data * decay + source_dict[key].data * (1 - decay))


def make_net(args: argparse.Namespace) -> MLP:
    torch.manual_seed(args.seed)  # the same initial weights for every contender
    return MLP(2, hidden=args.hidden, depth=args.depth)


def run_genkit(data: torch.Tensor, args: argparse.Namespace, full: bool, fused: bool) -> dict[str, float]:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # accelerate keeps per-process singletons
    GradientState._reset_state()
    saved = goptim._FUSED_ADAMW_DEVICES
    if not fused:
        goptim._FUSED_ADAMW_DEVICES = ()  # the "default AdamW" row: torch's own choice of implementation
    try:
        model = FlowMatching(make_net(args), sample_shape=(2,))
        # a trailing window keeps the final checkpoint write out of the timed one
        steps, stop = 2 * args.warmup + args.timed, args.warmup + args.timed
        extra = {} if full else {"ema_decay": None, "grad_clip": None, "min_lr_ratio": 1.0}
        with tempfile.TemporaryDirectory() as out:
            cfg = gtrain.TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                     log_every=args.warmup, checkpoint_every=None, out_dir=out, progress=False,
                                     cpu=True, **extra)
            marks: dict[int, tuple[float, float, float]] = {}  # step -> (wall, cpu, loss) at its log callback

            def mark(trainer: gtrain.Trainer, record: gtrain.LogRecord) -> None:
                marks[record.step] = (time.perf_counter(), time.process_time(), record.loss)

            trainer = gtrain.Trainer(model, cfg, callbacks=[mark])
            if trainer._fused != fused:
                raise RuntimeError("genkit's trainer did not pick fused AdamW on this CPU (torch < 2.4?)")
            trainer.fit(data)
    finally:
        goptim._FUSED_ADAMW_DEVICES = saved
    (w0, c0, _), (w1, c1, loss) = marks[args.warmup], marks[stop]
    return {"wall_ms": 1e3 * (w1 - w0) / args.timed, "cpu_ms": 1e3 * (c1 - c0) / args.timed, "final_loss": loss}


def run_torchcfm(data: torch.Tensor, args: argparse.Namespace, full: bool, fused: bool) -> dict[str, float]:
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

    net = make_net(args)
    ema_net = copy.deepcopy(net) if full else None
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0, fused=True if fused else None)
    steps, batch = args.warmup + args.timed, args.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(0, steps, 0.0)) if full else None
    fm = ConditionalFlowMatcher(sigma=0.0)
    n = data.shape[0]
    per_epoch = n // batch
    torch.manual_seed(args.seed)
    losses, wall, cpu = [], 0.0, 0.0
    for k in range(steps):
        if k == args.warmup:
            wall, cpu = time.perf_counter(), time.process_time()
        j = k % per_epoch
        if j == 0:
            perm = torch.randperm(n)
        x1 = data[perm[j * batch:(j + 1) * batch]]  # torchcfm: t = 0 noise, t = 1 data
        x0 = torch.randn_like(x1)
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        vt = net(xt, t)
        loss = torch.mean((vt - ut) ** 2)
        opt.zero_grad()
        loss.backward()
        if full:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if full:
            sched.step()
            cifar10_ema(net, ema_net, 0.999)
        if (k + 1) % args.warmup == 0:
            losses.append(loss.item())  # a user looks at the loss now and then
    return {"wall_ms": 1e3 * (time.perf_counter() - wall) / args.timed,
            "cpu_ms": 1e3 * (time.process_time() - cpu) / args.timed, "final_loss": losses[-1]}


CONTENDERS = {  # ordered so that the contenders each ratio compares run close together
    "genkit full": lambda d, a: run_genkit(d, a, full=True, fused=True),
    "torchcfm full": lambda d, a: run_torchcfm(d, a, full=True, fused=False),
    "genkit full (default AdamW)": lambda d, a: run_genkit(d, a, full=True, fused=False),
    "torchcfm full (fused AdamW)": lambda d, a: run_torchcfm(d, a, full=True, fused=True),
    "genkit bare": lambda d, a: run_genkit(d, a, full=False, fused=True),
    "torchcfm bare": lambda d, a: run_torchcfm(d, a, full=False, fused=False),
    "genkit bare (default AdamW)": lambda d, a: run_genkit(d, a, full=False, fused=False),
    "torchcfm bare (fused AdamW)": lambda d, a: run_torchcfm(d, a, full=False, fused=True),
}
RATIOS = [  # (row, genkit contender, torchcfm contender, what it says)
    ("full, as shipped", "genkit full", "torchcfm full", "what users of each get"),
    ("bare, as shipped", "genkit bare", "torchcfm bare", "like for like without EMA/clip/schedule"),
    ("full, same AdamW kernel (fused)", "genkit full", "torchcfm full (fused AdamW)", "trainer overhead only"),
    ("bare, same AdamW kernel (fused)", "genkit bare", "torchcfm bare (fused AdamW)", "trainer overhead only"),
    ("full, same AdamW kernel (default)", "genkit full (default AdamW)", "torchcfm full",
     "trainer overhead only"),
    ("bare, same AdamW kernel (default)", "genkit bare (default AdamW)", "torchcfm bare",
     "trainer overhead only"),
]

DIFFERENCES = [
    "Same: MLP(2, hidden, depth) with identical initial weights, moons data (8192 points, reshuffled every "
    "epoch), batch size, AdamW(lr, weight_decay=0), number of steps, float32, one process on the CPU.",
    "full rows: both clip the gradient norm at 1.0, step a LambdaLR (the same cosine factor) and keep an EMA "
    "(0.999). genkit's EMA is fp32 with warm-up, one multi-tensor lerp; torchcfm's example EMA is a "
    "per-tensor `copy_(t * d + s * (1 - d))` over the state dict.",
    "bare rows: genkit still checks batch and loss for NaN/inf (one host sync), computes the gradient norm "
    "for logging and the non-finite policy, steps its LambdaLR (constant factor) and re-seeds its RNG streams "
    "from (seed, step, rank) every step; the torchcfm loop does none of that.",
    "genkit draws t and the noise from a per-step torch.Generator inside FlowMatching.loss and goes through "
    "accelerate's prepared module/optimizer and the path's conversions; the torchcfm loop uses the global RNG "
    "and ConditionalFlowMatcher.sample_location_and_conditional_flow. Time conventions differ (torchcfm t=0 "
    "noise); the work per step does not.",
    "genkit logs to metrics.jsonl every `warmup` steps (its log callbacks mark the timed window); the torchcfm "
    "loop calls loss.item() as often. No progress bars on either side.",
    "AdamW kernel: rows marked 'as shipped' use genkit's fused AdamW against torch's default implementation "
    "(what a torchcfm user writes); the 'same AdamW kernel' rows use one implementation on both sides.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps; also genkit's log interval")
    parser.add_argument("--timed", type=int, default=30, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 for stable numbers)")
    parser.add_argument("--name", default="bench_fm_training")
    args = parser.parse_args()
    if args.timed % args.warmup:
        parser.error("--timed must be a multiple of --warmup (genkit's log callbacks time the steps)")
    torch.set_num_threads(args.threads)
    data = load_dataset("moons", n=8192, generator=torch.Generator().manual_seed(args.seed))

    names = list(CONTENDERS)
    burn_in = argparse.Namespace(**{**vars(args), "timed": args.warmup})
    for name in names:  # first runs in a process pay one-off costs (lazy init, allocator growth): discard them
        CONTENDERS[name](data, burn_in)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no contender always goes first
        for name in order:
            runs[name].append(CONTENDERS[name](data, args))
        print(f"repeat {r + 1}/{args.repeats} (cpu ms/step): "
              + ", ".join(f"{k} {runs[k][-1]['cpu_ms']:.2f}" for k in names), flush=True)

    payload: dict = {
        "settings": {**vars(args), "data": "moons, 8192 points", "optimizer": "AdamW(weight_decay=0)",
                     "net": f"genkit.nets.MLP(2, hidden={args.hidden}, depth={args.depth})"},
        "differences": DIFFERENCES, "target": "genkit/torchcfm time per step <= 1.0",
        "final_loss": {k: [x["final_loss"] for x in runs[k]] for k in names},
    }
    sections = []
    for clock, title in (("cpu_ms", "process CPU time"), ("wall_ms", "wall-clock time")):
        per_step = {k: [x[clock] for x in v] for k, v in runs.items()}
        med = {k: median(v) for k, v in per_step.items()}
        ratios = []
        for row, g, c, meaning in RATIOS:
            paired = [a / b for a, b in zip(per_step[g], per_step[c])]  # measured in the same repeat
            ratios.append({"row": row, "genkit": g, "torchcfm": c, "meaning": meaning, "genkit_ms": med[g],
                           "torchcfm_ms": med[c], "median_paired_ratio": median(paired),
                           "ratio_of_medians": med[g] / med[c], "ratio_of_minima": min(per_step[g]) / min(per_step[c]),
                           "paired_ratios": paired})
        payload[clock] = {"per_step": {k: {"median": med[k], "repeats": per_step[k]} for k in names},
                          "ratios": ratios}
        table1 = markdown_table(["contender", "median ms/step", "min", "max"],
                                [[k, med[k], min(per_step[k]), max(per_step[k])] for k in names])
        table2 = markdown_table(["comparison", "genkit ms", "torchcfm ms", "median paired ratio",
                                 "ratio of medians", "ratio of minima", "what it says"],
                                [[x["row"], x["genkit_ms"], x["torchcfm_ms"], x["median_paired_ratio"],
                                  x["ratio_of_medians"], x["ratio_of_minima"], x["meaning"]] for x in ratios])
        sections.append(f"## {title[0].upper() + title[1:]} per step\n\n{table1}\n\n"
                        f"## Ratios genkit / torchcfm ({title})\n\n{table2}")
    losses = markdown_table(["contender", "loss at the last timed step (median over repeats)"],
                            [[k, median(v)] for k, v in payload["final_loss"].items()])
    md = (f"{args.repeats} repeats x {args.timed} timed steps (after {args.warmup} warm-up steps) per contender, "
          f"batch {args.batch_size}, contenders interleaved (order rotated every repeat). The paired ratio is "
          "genkit/torchcfm within one repeat; its median is the headline. Process CPU time (one torch thread) "
          "is the steadier clock on a shared machine, where wall-clock time also counts the time other "
          "processes hold the core; both are given. Target: genkit/torchcfm <= 1.0.\n\n"
          + "\n\n".join(sections) + f"\n\n## Loss (sanity: both train)\n\n{losses}\n\n## What differs\n\n"
          + "\n".join(f"- {d}" for d in DIFFERENCES))
    paths = write_results(args.name, payload, md)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
