"""Distil (or fine-tune) a flow-matching or diffusion checkpoint into a few-step secant model, then compare it
with the teacher's own solvers at equal NFE.

A secant model f(x, t, s) learns the average velocity over a step (Liu & Yue 2025, arXiv 2505.14502), so N
learned jumps x <- x + (s - t) f(x, t, s) from noise to data replace an N-step solver. Losses:
  sdei  distil: t on the step grid, interior point estimated by the model (the paper's main loss)
  stei  distil: t anywhere, plus flow matching on f(x, t, t)
  sdee  distil: interior point exact, start point estimated; both directions
  stee  no teacher in the loss: target the conditional velocity of the data (the teacher only makes data
        and is the reference of the final table)

The training data are the teacher's samples (--ref-solver x --ref-steps), drawn afresh for every step from
(seed, step, rank) by a batch source, unless --data names a genkit data set (--n-data samples of it). The
network starts as a copy of the teacher's when that is a velocity MLP/UNet (flow matching); otherwise, or
with --init scratch, a fresh two-time network of the teacher's size. The out dir holds
checkpoint/ (loadable with genkit.load), metrics.jsonl and secant_eval.json; the table printed at the end
gives each sampler's endpoint error, the per-sample L2 RMS to the teacher's --ref-solver x --ref-steps endpoint
from the same noise (genkit.metrics.endpoint_rms, as in compare.py and search_solver.py; rows marked * are step
counts the model was not trained for). The run folder's train_data.json records what the model learned (the
teacher's data), so eval/evaluate.py --checkpoint OUT scores it against that, with its learned jumps.

examples:
  python train/train.py --out runs/fm                      # a teacher
  python train/secant.py --teacher runs/fm --steps-inference 4 --loss sdei --out runs/fm_secant4
  python train/secant.py --teacher runs/fm --steps-inference 1,2,4 --loss stee --train-steps 3000 --out runs/s
  accelerate launch train/secant.py --teacher runs/fm --out runs/fm_secant
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import genkit
from genkit import checkpoint
from genkit.cli import (
    HelpFormatter,
    ScriptParser,
    TeacherSamples,
    checkpoint_dir,
    load_teacher,
    log_lines,
    run_main,
    step_list,
    trained_data,
)
from genkit.data import DATASETS, load_dataset
from genkit.errors import ConfigError
from genkit.metrics import ENDPOINT_ERROR, endpoint_rms
from genkit.models.secant import LOSSES, Secant
from genkit.nets import MLP, UNet
from genkit.nets.two_time import TwoTimeMLP, TwoTimeUNet
from genkit.solvers import SOLVERS
from genkit.train import TrainConfig, Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(prog="secant.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, metavar="DIR", help="teacher checkpoint (or a train.py run folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory; an existing one is resumed")
    g = p.add_argument_group("secant model")
    g.add_argument("--steps-inference", default="4", metavar="N[,N...]",
                   help="inference step count(s) N the jumps are sized for, e.g. 4 or 1,2,4 (each training sample "
                        "draws one)")
    g.add_argument("--loss", default="sdei", metavar="NAME", help=f"one of {', '.join(LOSSES)}")
    g.add_argument("--tangent-weight", type=float, metavar="W",
                   help="weight of flow matching on f(x, t, t) (default: 1 for stei, else 0)")
    g.add_argument("--init", default="auto", metavar="HOW",
                   help="auto (the teacher's weights when they are a velocity net), teacher, or scratch")
    g.add_argument("--hidden", type=int, metavar="N",
                   help="--init scratch, vectors: MLP width (default: the teacher's)")
    g.add_argument("--depth", type=int, metavar="N",
                   help="--init scratch, vectors: MLP blocks (default: the teacher's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="teacher", metavar="NAME",
                   help=f"'teacher' (samples of the teacher) or a data set: {', '.join(DATASETS.names())}")
    g.add_argument("--n-data", type=int, default=10000, metavar="N",
                   help="--data NAME: samples of the data set (the teacher's are drawn per step)")
    g = p.add_argument_group("training")
    g.add_argument("--train-steps", type=int, default=2000, metavar="N",
                   help="optimizer steps (a resumed run continues to it)")
    g.add_argument("--batch-size", type=int, default=256, metavar="N", help="per process")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)")
    g.add_argument("--warmup", type=int, metavar="N", help="linear warm-up steps (default: min(100, steps // 10))")
    g.add_argument("--ema-decay", metavar="D", type=lambda v: None if v.lower() == "none" else float(v), default=0.999,
                   help="EMA decay, or 'none'")
    g.add_argument("--mixed-precision", default="no", metavar="P", help="no, bf16 or fp16")
    g.add_argument("--seed", type=int, default=0, help="seeds data, initialisation, training noise and evaluation")
    g.add_argument("--checkpoint-every", type=int, default=500, metavar="N",
                   help="steps between checkpoints (and at the end)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--threads", type=int, default=1, metavar="N", help="CPU threads for torch")
    g = p.add_argument_group("evaluation")
    g.add_argument("--table-steps", default="1,2,4,8", metavar="N[,N...]",
                   help="step counts (= NFE) compared in the final table")
    g.add_argument("--eval-samples", type=int, default=2000, metavar="N", help="noise draws of the table")
    g.add_argument("--ref-solver", default="rk4", metavar="NAME",
                   help=f"reference (and data) solver, one of {', '.join(SOLVERS.names())}")
    g.add_argument("--ref-steps", type=int, default=64, metavar="N", help="reference solver steps")
    args = p.parse_args(argv)
    if args.loss not in LOSSES:
        raise ConfigError(f"unknown --loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    if args.init not in ("auto", "teacher", "scratch"):
        raise ConfigError(f"unknown --init {args.init!r}; choose auto, teacher or scratch")
    args.steps_inference = step_list(args.steps_inference, "--steps-inference")
    args.table_steps = step_list(args.table_steps, "--table-steps")
    for flag in ("n_data", "train_steps", "batch_size", "eval_samples", "ref_steps", "threads"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer; got {getattr(args, flag)}")
    genkit.get_solver(args.ref_solver)
    return args


def build_model(args: argparse.Namespace, teacher: Any) -> Secant:
    kw = {"loss": args.loss, "steps": args.steps_inference, "tangent_weight": args.tangent_weight}
    if args.init != "scratch":
        try:
            model = Secant.from_teacher(teacher, **kw)
            if args.hidden or args.depth:
                raise ConfigError("--hidden/--depth size a network trained from scratch; add --init scratch")
            return model
        except ConfigError:
            if args.init == "teacher":
                raise
    net = teacher.net
    if isinstance(net, MLP):
        c = net.config()
        two = TwoTimeMLP(c["dim"], hidden=args.hidden or c["hidden"], depth=args.depth or c["depth"],
                         time_dim=c["time_dim"])
    elif isinstance(net, UNet):
        c = {k: v for k, v in net.config().items() if k not in ("name", "num_classes")}
        two = TwoTimeUNet(**c)
    else:
        raise ConfigError(f"no two-time network matches the teacher's {type(net).__name__}; use an MLP or UNet teacher")
    return Secant.from_teacher(teacher, net=two, **kw)


def training_data(args: argparse.Namespace, teacher: Any, device: torch.device) -> torch.Tensor | TeacherSamples:
    if args.data != "teacher":
        return load_dataset(args.data, n=args.n_data, generator=torch.Generator().manual_seed(args.seed))
    return TeacherSamples(teacher, args.batch_size, args.ref_solver, args.ref_steps)


def evaluate(args: argparse.Namespace, model: Secant, teacher: Any, device: torch.device) -> list[dict[str, Any]]:
    """Endpoint error (genkit.metrics.endpoint_rms: per-sample L2 RMS) to the teacher's reference solve from the
    same noise, per step count."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    x1 = teacher.path.sample_prior((args.eval_samples, *teacher.sample_shape), generator=gen, device=device)
    grid = genkit.get_grid("uniform", t_max=model.t_max, t_min=model.t_min)  # the teacher's range (from_teacher)
    with torch.no_grad():
        ref = genkit.solve(teacher, x1, args.ref_solver, args.ref_steps, grid).samples

        def rms(x: torch.Tensor) -> float:
            return endpoint_rms(x, ref)

        rows = []
        for n in args.table_steps:
            rows.append({"nfe": n, "trained": n in model.steps, "secant": rms(model.integrate(x1, n).samples),
                         "euler": rms(genkit.solve(teacher, x1, "euler", n, grid).samples),
                         "heun": rms(genkit.solve(teacher, x1, "heun", n // 2, grid).samples) if n % 2 == 0 else None})
    return rows


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"\nendpoint error: {ENDPOINT_ERROR} (the teacher's {args.ref_solver} x {args.ref_steps} endpoint), "
          f"{args.eval_samples} draws of the same noise (loss {args.loss}, trained for N = "
          f"{','.join(map(str, args.steps_inference))})")
    print(f"{'NFE':>5}  {'secant':>10}  {'euler':>10}  {'heun':>10}")
    for r in rows:
        heun = f"{r['heun']:10.4g}" if r["heun"] is not None else f"{'-':>10}"
        mark = " " if r["trained"] else "*"
        print(f"{r['nfe']:>4}{mark}  {r['secant']:10.4g}  {r['euler']:10.4g}  {heun}")
    if not all(r["trained"] for r in rows):
        print("* a step count the model was not trained for (add it to --steps-inference)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    warmup = min(100, args.train_steps // 10) if args.warmup is None else args.warmup
    config = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=warmup,
                         ema_decay=args.ema_decay, mixed_precision=args.mixed_precision, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, out_dir=args.out, progress=not args.no_progress)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    teacher = load_teacher(args.teacher, acc.device)
    torch.manual_seed(args.seed)  # a from-scratch network: the same on every rank and every re-run
    model = build_model(args, teacher)
    ckpt = Path(args.out) / "checkpoint"
    if checkpoint.has_resume_state(ckpt):
        saved = {k: v for k, v in checkpoint.read_config(ckpt).items() if k in model.config()}
        if saved != json.loads(json.dumps(model.config())):
            raise ConfigError(f"{ckpt} holds a different secant model; re-run with that run's flags to resume it, "
                              "or pick a new --out")
    data = training_data(args, teacher, acc.device)
    if isinstance(data, torch.Tensor) and tuple(data.shape[1:]) != model.sample_shape:
        raise ConfigError(f"--data {args.data} has samples of shape {tuple(data.shape[1:])} but the teacher makes "
                          f"{model.sample_shape}; use the teacher's data set or --data teacher")
    trainer = Trainer(model, config, accelerator=acc, callbacks=[log_lines()] if args.no_progress else ())
    if acc.is_main_process:
        logging.basicConfig(format="%(message)s", stream=sys.stdout)
        logging.getLogger("genkit").setLevel(logging.INFO)
        learned = {"data": args.data} if args.data != "teacher" else trained_data(checkpoint_dir(args.teacher))
        if learned:  # what eval/evaluate.py scores the model against by default
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "train_data.json").write_text(json.dumps(learned) + "\n", encoding="utf-8")
    result = trainer.fit(data)
    if not acc.is_main_process:
        return
    trained = genkit.load(ckpt, map_location=acc.device)  # EMA weights, as a user would load them
    rows = evaluate(args, trained, teacher, acc.device)
    (Path(args.out) / "secant_eval.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                                 "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print_table(args, rows)
    print(f"\ntrained to step {result.step}; checkpoint: {ckpt} (genkit.load it; model.sample(n, steps=N) jumps)")


if __name__ == "__main__":
    sys.exit(run_main(main))
