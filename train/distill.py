"""Distil a multi-step checkpoint (genkit flow matching or diffusion, or a diffusers pipeline folder) into a
one- or few-step model, then score the student at 1, 2 and 4 NFE against the teacher at 1, 2, 4, 8 and 50 NFE.

Methods (--method):
  meanflow  MeanFlow (Geng et al. 2025) on the teacher: the teacher's velocity is the JVP tangent and the
            target's velocity; the network starts as a two-time copy of the teacher's when that is a velocity
            net (flow matching), else (or with --init scratch) a fresh one of the teacher's size.
            --modulation sets Modular MeanFlow's lambda. --velocity conditional trains on MeanFlow's own target
            (e - x of the pair) instead, the teacher supplying its weights, path and samples: measured on the
            moons teacher of train.py (1000 steps, sliced W2 at 1 NFE), 0.44 (its data) / 0.41 (its samples) vs
            0.75 with the teacher's velocity, which fits the r = t pairs almost exactly and learns the jumps
            slowly (the adaptive weight then favours those pairs); not yet the default, a study is open.
  smd       Score-of-Mixture Distillation (Kim et al. 2025): generator and fake score start as copies of the
            teacher's network; data-free (the teacher's own samples train the density ratio) unless --data NAME.
  secant    a secant model (train/secant.py's losses, --loss, --steps-inference) distilled from the teacher.

The run folder --out holds checkpoint/ (the common format: genkit.load it; samplers/sample.py and
eval/evaluate.py take it, their default is one learned jump), metrics.jsonl, train_data.json (what
eval/evaluate.py scores it against), and distill_table.{json,md}: the metrics eval/evaluate.py computes (digits:
Frechet distance in the digits classifier's features; vectors: sliced W2, energy distance, MMD) against held-out
data of the teacher's data set, with the noise floor of a second held-out draw, for the student at
--student-nfe and the teacher at --teacher-nfe, where at each NFE the teacher runs with the best of genkit's
deterministic fixed-step solvers at that budget (all candidates are in the JSON; picking the best on the
held-out data favours the teacher). The teacher's data set comes from its run's train_data.json, or
--eval-data NAME (a diffusers folder records none); --no-eval skips the table.

Training data (--data): meanflow defaults to the teacher's data set when its run records one (z_t then
follows the data's marginals, where the teacher was trained), else the teacher's own samples (--data teacher,
drawn afresh each step by --ref-solver x --ref-steps: the student then learns the teacher's flow map); secant
defaults to the teacher's samples; smd is data-free by default. A resumed run (an existing --out) must use the
same method and flags.

examples:
  python train/train.py --out runs/fm                                        # a teacher (moons)
  python train/distill.py --teacher runs/fm --method meanflow --out runs/fm_meanflow
  python train/distill.py --teacher runs/fm --method smd --train-steps 1000 --out runs/fm_smd
  python train/distill.py --teacher runs/fm --method secant --loss sdei --steps-inference 1,2,4 --out runs/fm_sec
  python train/distill.py --teacher ddpm_folder --method smd --eval-data digits --out runs/ddpm_smd
  accelerate launch train/distill.py --teacher runs/fm --method meanflow --out runs/fm_meanflow
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

import genkit
from genkit import checkpoint
from genkit.cli import (
    HelpFormatter,
    ScriptParser,
    TeacherSamples,
    check_method,
    checkpoint_dir,
    digits_features,
    is_diffusers_folder,
    load_teacher,
    log_lines,
    run_main,
    sample_distances,
    step_list,
    trained_data,
)
from genkit.data import DATASETS, held_out, load_dataset
from genkit.errors import ConfigError, GenkitError, ShapeError
from genkit.models.meanflow import MeanFlow
from genkit.models.secant import LOSSES, Secant
from genkit.models.smd import SMD
from genkit.nets import build as build_net
from genkit.solvers import SOLVERS
from genkit.train import TrainConfig, Trainer, make_accelerator

METHODS = ("meanflow", "smd", "secant")
#: each method's own flags (argparse dests); one given to another method is an error
METHOD_FLAGS = {
    "meanflow": ("frac_r_neq_t", "modulation", "modulation_warmup", "norm_p", "init", "velocity"),
    "smd": ("score_updates", "teacher_steps", "gen_gan_weight"),
    "secant": ("loss", "steps_inference", "tangent_weight", "init"),
}
#: the primary metric that picks the teacher's best solver at an NFE
PRIMARY = {"image": "frechet_digits", "vector": "sliced_w2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(prog="distill.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, metavar="DIR",
                   help="genkit checkpoint (or train.py run folder) or diffusers pipeline folder")
    p.add_argument("--method", required=True, metavar="NAME", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory; an existing one is resumed")
    p.add_argument("--data", metavar="NAME",
                   help=f"training data: 'teacher' (its samples) or a data set ({', '.join(DATASETS.names())}) "
                        "(default: see above)")
    p.add_argument("--n-data", type=int, default=20000, metavar="N", help="--data NAME: samples of a toy set")
    g = p.add_argument_group("meanflow (--method meanflow)")
    g.add_argument("--frac-r-neq-t", type=float, metavar="F", help="share of training pairs with r != t (0.75)")
    g.add_argument("--modulation", type=float, metavar="L", help="Modular MeanFlow's lambda in [0, 1] (0)")
    g.add_argument("--modulation-warmup", type=int, metavar="N", help="linear warm-up steps of lambda (0)")
    g.add_argument("--norm-p", type=float, metavar="P", help="adaptive loss weight power (0, plain L2)")
    g.add_argument("--init", metavar="HOW", help="meanflow, secant: auto (the teacher's weights when they are a "
                                                 "velocity net; meanflow from an MLP or UNet teacher: scratch, with "
                                                 "smooth time features), teacher, or scratch (auto)")
    g.add_argument("--velocity", metavar="V",
                   help="meanflow: the velocity of the JVP tangent and the target: 'teacher' (its marginal velocity "
                        "v(z_t, t)) or 'conditional' (e - x of the training pair, as MeanFlow from scratch; the "
                        "teacher then only supplies the path, range and, with --data teacher, the samples) (teacher)")
    g = p.add_argument_group("smd (--method smd)")
    g.add_argument("--score-updates", type=int, metavar="N", help="score updates per generator update (5)")
    g.add_argument("--teacher-steps", type=int, metavar="N", help="steps of the teacher's samples (16)")
    g.add_argument("--gen-gan-weight", type=float, metavar="W", help="generator GAN term weight (3e-3)")
    g = p.add_argument_group("secant (--method secant)")
    g.add_argument("--loss", metavar="NAME", help=f"one of {', '.join(LOSSES)} (sdei)")
    g.add_argument("--steps-inference", metavar="N[,N...]", help="jump counts trained for (1,2,4)")
    g.add_argument("--tangent-weight", type=float, metavar="W", help="flow matching weight on f(x, t, t)")
    g = p.add_argument_group("training")
    g.add_argument("--train-steps", type=int, default=2000, metavar="N",
                   help="optimizer steps, every update counted (a resumed run continues to it)")
    g.add_argument("--batch-size", type=int, default=256, metavar="N", help="per process")
    g.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate (AdamW, cosine decay); smd: the generator's, its score networks 5x (the "
                        "paper's 1e-4 is for ImageNet-size UNets; on the 2-D and digits nets here 1e-4 learned "
                        "several times slower)")
    g.add_argument("--warmup", type=int, metavar="N", help="linear warm-up steps (default: min(100, steps // 10))")
    g.add_argument("--ema-decay", metavar="D", type=lambda v: None if v.lower() == "none" else float(v), default=0.999,
                   help="EMA decay, or 'none'")
    g.add_argument("--mixed-precision", default="no", metavar="P", help="no, bf16 or fp16")
    g.add_argument("--seed", type=int, default=0, help="seeds data, initialisation, training noise and evaluation")
    g.add_argument("--checkpoint-every", type=int, default=500, metavar="N", help="steps between checkpoints")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--threads", type=int, default=1, metavar="N", help="CPU threads for torch")
    g.add_argument("--ref-solver", default="heun", metavar="NAME", help="solver of the teacher's samples (--data "
                                                                        "teacher)")
    g.add_argument("--ref-steps", type=int, default=32, metavar="N", help="steps of the teacher's samples")
    g = p.add_argument_group("evaluation")
    g.add_argument("--student-nfe", default="1,2,4", metavar="N[,N...]", help="the student's step counts (= NFE)")
    g.add_argument("--teacher-nfe", default="1,2,4,8,50", metavar="N[,N...]", help="the teacher's NFE budgets")
    g.add_argument("--eval-samples", type=int, default=2000, metavar="N",
                   help="samples per row (and held-out size of toy sets; digits: its test split)")
    g.add_argument("--eval-data", metavar="NAME", help="held-out data set of the table (default: the teacher's, "
                                                       "from its train_data.json)")
    g.add_argument("--no-eval", action="store_true", help="skip the table")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    check_method(args, METHOD_FLAGS)
    if args.velocity not in (None, "teacher", "conditional"):
        raise ConfigError(f"unknown --velocity {args.velocity!r}; choose teacher or conditional")
    if args.init not in (None, "auto", "teacher", "scratch"):
        raise ConfigError(f"unknown --init {args.init!r}; choose auto, teacher or scratch")
    if args.loss is not None and args.loss not in LOSSES:
        raise ConfigError(f"unknown --loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    args.student_nfe = step_list(args.student_nfe, "--student-nfe")
    args.teacher_nfe = step_list(args.teacher_nfe, "--teacher-nfe")
    if args.steps_inference is not None:
        args.steps_inference = step_list(args.steps_inference, "--steps-inference")
    for flag in ("n_data", "train_steps", "batch_size", "eval_samples", "ref_steps", "threads", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer; got {getattr(args, flag)}")
    if args.data is not None and args.data != "teacher" and args.data not in DATASETS.names():
        raise ConfigError(f"unknown --data {args.data!r}; choose 'teacher' or one of {', '.join(DATASETS.names())}")
    if args.method == "smd" and args.data == "teacher":
        raise ConfigError("--method smd draws the teacher's samples itself (data-free, --teacher-steps); drop "
                          "--data teacher, or pass --data NAME to train its density ratio on real data")
    genkit.get_solver(args.ref_solver)


def student_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The method's flags the user gave, as the model's keyword arguments (the rest keep the model's defaults)."""
    script_only = ("init", "velocity", "steps_inference")  # read by build_student / build_meanflow, or below
    kw = {k: getattr(args, k) for k in METHOD_FLAGS[args.method]
          if k not in script_only and getattr(args, k) is not None}
    if args.method == "secant":
        kw.setdefault("loss", "sdei")
        kw["steps"] = args.steps_inference or (1, 2, 4)
    if args.method == "smd":
        kw["batch_size"] = args.batch_size
        if args.data is not None:
            kw["real"] = "data"
    return kw


def build_student(args: argparse.Namespace, teacher: Any) -> torch.nn.Module:
    """The student of ``--method`` for ``teacher``: from the teacher's weights where they fit (``--init auto``),
    else a fresh network of the teacher's size (seeded by ``--seed``); where the student's family asks for network
    options of its own (``net_options``: MeanFlow's smooth time features, since the teacher's reach frequency 1000
    and fill MeanFlow's ``d_t u`` target with noise) the student is such a fresh network unless ``--init
    teacher``."""
    kw = student_kwargs(args)
    if args.method == "smd":
        return SMD.from_teacher(teacher, **kw)
    cls = MeanFlow if args.method == "meanflow" else Secant
    config = teacher.net.config() if callable(getattr(getattr(teacher, "net", None), "config", None)) else {}
    kind = config.get("name")
    # the family's own network options (MeanFlow's smooth time features); a net that needs them is built fresh
    options = cls.net_options(args, kind) if kind in ("mlp", "unet") else {}
    if args.init == "teacher" or (args.init != "scratch" and not options):
        try:
            return cls.from_teacher(teacher, **kw)
        except ConfigError:
            if args.init == "teacher":
                raise
    torch.manual_seed(args.seed)  # a from-scratch network: the same on every rank and every re-run
    # the teacher's architecture, fresh weights (from_teacher makes it two-time); MeanFlow's with smooth features
    net = build_net({**config, **options} if options else teacher.net.config())
    return cls.from_teacher(teacher, net=net, **kw)


def build_meanflow(args: argparse.Namespace, teacher: Any) -> MeanFlow:
    """The MeanFlow student: ``from_teacher`` (the teacher's path, range, classes and, where
    :func:`build_student` takes them, its weights); ``--velocity conditional`` then detaches the teacher, so the
    target is MeanFlow's own ``e - x``."""
    student = build_student(args, teacher)
    if args.velocity == "conditional":
        student.set_teacher(None)
    return student


def default_data(args: argparse.Namespace) -> str | None:
    """``--data`` when not given: the teacher's data set for meanflow (when its run records one), the teacher's
    samples for secant, none (data-free) for smd."""
    if args.data is not None:
        return args.data
    if args.method == "smd":
        return None
    if args.method == "meanflow" and not is_diffusers_folder(args.teacher):
        name = (trained_data(checkpoint_dir(args.teacher)) or {}).get("data")
        if name in DATASETS.names():
            return name
    return "teacher"


def training_data(args: argparse.Namespace, teacher: Any, shape: tuple[int, ...]) -> Any:
    if args.data is None:
        return None
    if args.data == "teacher":
        return TeacherSamples(teacher, args.batch_size, args.ref_solver, args.ref_steps)
    data = load_dataset(args.data, n=args.n_data, generator=torch.Generator().manual_seed(args.seed))
    if tuple(data.shape[1:]) != shape:
        raise ShapeError(f"--data {args.data} has samples of shape {tuple(data.shape[1:])} but the teacher makes "
                         f"{shape}; use the teacher's data set or --data teacher")
    return data


def eval_data(args: argparse.Namespace, shape: tuple[int, ...]) -> str | None:
    """The data set of the table: --eval-data, else the teacher run's; a ConfigError when neither says, a
    ShapeError when its samples are not of the teacher's ``shape``."""
    if args.no_eval:
        return None
    if args.eval_data is not None:
        if args.eval_data not in DATASETS.names():
            raise ConfigError(f"unknown --eval-data {args.eval_data!r}; choose one of {', '.join(DATASETS.names())}")
        name = args.eval_data
    else:
        name = None if is_diffusers_folder(args.teacher) else \
            (trained_data(checkpoint_dir(args.teacher)) or {}).get("data")
    if name is None:
        raise ConfigError(f"--eval-data is needed: nothing records what {args.teacher} was trained on (no "
                          "train_data.json beside it); pass --eval-data NAME, the data set it learned, or --no-eval")
    found = tuple(held_out(name, 2, args.seed)[0].shape[1:])
    if found != shape:
        raise ShapeError(f"--eval-data {name} has samples of shape {found} but the teacher makes {shape}; pass the "
                         "data set the teacher learned")
    if len(found) == 3 and name != "digits":
        raise ConfigError(f"--eval-data {name}: only digits images have a built-in feature network; pass --no-eval "
                          "and score samples with genkit.metrics.fid")
    return name


def teacher_candidates(nfe: int) -> list[tuple[str, int]]:
    """``(solver, steps)`` of every deterministic fixed-step genkit solver that spends exactly ``nfe``
    evaluations."""
    out = []
    for name in SOLVERS.names():
        s = genkit.get_solver(name)
        if s.stochastic or not s.fixed_step or not s.evals_per_step or nfe % s.evals_per_step:
            continue
        steps = nfe // s.evals_per_step
        if steps >= s.min_steps:
            out.append((name, steps))
    return out


def evaluate(args: argparse.Namespace, student: Any, teacher: Any, data: str,
             device: torch.device) -> dict[str, Any]:
    """The table: the student at --student-nfe and the teacher at --teacher-nfe (its best solver at each NFE),
    against held-out data of ``data`` with the noise floor."""
    ref, floor = held_out(data, args.eval_samples, args.seed)
    kind = "image" if ref.ndim == 4 else "vector"
    features = digits_features() if kind == "image" else None
    n = len(ref)

    def score(model: Any, **kw: Any) -> dict[str, Any]:
        gen = torch.Generator(device=device).manual_seed(args.seed + 2)
        t0 = time.perf_counter()
        with torch.no_grad():
            sol = model.sample(n, generator=gen, return_solution=True, device=device, **kw)
        x = sol.samples.float().cpu()
        return {"nfe": sol.nfe, "time_s": time.perf_counter() - t0, **sample_distances(x, ref, features, args.seed)}

    primary = PRIMARY[kind]
    teacher_rows, candidates = [], []
    for nfe in args.teacher_nfe:
        tried = []
        for solver, steps in teacher_candidates(nfe):
            row = {"solver": solver, "steps": steps, **score(teacher, solver=solver, steps=steps)}
            tried.append(row)
            candidates.append(row)
        if tried:
            teacher_rows.append({"budget": nfe, **min(tried, key=lambda r: r[primary])})
    student_rows = []
    samplers = ["jumps"] + (["restart"] if "restart" in student.samplers() else [])
    for k in args.student_nfe:
        for name in samplers:
            sampler = student.get_sampler(name, steps=k)
            student_rows.append({"budget": k, "sampler": name, **score(student, sampler=sampler)})
    reference = next((r for r in teacher_rows if r["budget"] == max(args.teacher_nfe)), None)
    for row in student_rows + teacher_rows:
        row["ratio_to_teacher_best"] = None if reference is None else row[primary] / reference[primary]
    return {"data": data, "n": n, "metric": primary, "noise_floor": sample_distances(floor, ref, features, args.seed),
            "teacher": teacher_rows, "student": student_rows, "teacher_candidates": candidates,
            "teacher_reference_nfe": None if reference is None else reference["budget"]}


def markdown(args: argparse.Namespace, table: dict[str, Any], steps: dict[str, Any]) -> str:
    m = table["metric"]
    lines = [f"# distill.py --method {args.method}: {args.teacher} -> {args.out}", "",
             f"{table['n']} samples against held-out {table['data']} ({m}; noise floor "
             f"{table['noise_floor'][m]:.4g}, a second held-out draw). Teacher: the best genkit solver at each NFE. "
             f"Ratio: to the teacher at {table['teacher_reference_nfe']} NFE.", "",
             f"Training steps: student {steps['student']}, teacher {steps['teacher']}"
             + (f" (ratio {steps['ratio']:.3g})" if steps.get("ratio") is not None else ""), "",
             f"| model | NFE | sampler | {m} | ratio |", "|---|---|---|---|---|"]
    for r in table["student"]:
        lines.append(f"| student ({args.method}) | {r['nfe']} | {r['sampler']} | {r[m]:.4g} | "
                     f"{r['ratio_to_teacher_best']:.3g} |")
    for r in table["teacher"]:
        lines.append(f"| teacher | {r['nfe']} | {r['solver']} x {r['steps']} | {r[m]:.4g} | "
                     f"{r['ratio_to_teacher_best']:.3g} |")
    return "\n".join(lines) + "\n"


def teacher_steps(path: str) -> int | None:
    """The teacher's training steps, from its checkpoint's trainer state (None for a diffusers folder)."""
    if is_diffusers_folder(path):
        return None
    try:
        return int(checkpoint.read_trainer_state(checkpoint_dir(path))["step"])
    except (OSError, KeyError, ValueError, TypeError, GenkitError):
        return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.data = default_data(args)
    teacher = load_teacher(args.teacher)  # on the CPU until the accelerator says where
    table_data = eval_data(args, tuple(teacher.sample_shape))  # before training: bad --eval-data fails now
    warmup = min(100, args.train_steps // 10) if args.warmup is None else args.warmup
    config = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=warmup,
                         ema_decay=args.ema_decay, mixed_precision=args.mixed_precision, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, out_dir=args.out, progress=not args.no_progress)
    student = build_meanflow(args, teacher) if args.method == "meanflow" else build_student(args, teacher)
    acc = make_accelerator(config, student)  # finds unused parameters for smd's two alternating optimizers
    student.to(acc.device)  # the frozen teacher moves with it
    ckpt = Path(args.out) / "checkpoint"
    if checkpoint.has_resume_state(ckpt):
        saved = checkpoint.read_config(ckpt)
        mine = json.loads(json.dumps(student.config()))
        if saved.get("family") != student.family or {k: v for k, v in saved.items() if k in mine} != mine:
            raise ConfigError(f"{ckpt} holds a different {saved.get('family')!r} model; re-run with that run's "
                              "--method and flags to resume it, or pick a new --out")
        saved = checkpoint.read_trainer_state(ckpt).get("train_config") or {}
        if args.warmup is None and isinstance(saved.get("warmup_steps"), int):
            config.warmup_steps = min(saved["warmup_steps"], config.steps)  # the default follows the steps: keep it
    data = training_data(args, teacher, tuple(student.sample_shape))
    trainer = Trainer(student, config, accelerator=acc, callbacks=[log_lines()] if args.no_progress else ())
    if acc.is_main_process:
        logging.basicConfig(format="%(message)s", stream=sys.stdout)
        logging.getLogger("genkit").setLevel(logging.INFO)
        learned = {"data": table_data} if table_data is not None else None
        if learned is None and args.data not in (None, "teacher"):
            learned = {"data": args.data}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        if learned:  # what eval/evaluate.py scores the model against by default
            (Path(args.out) / "train_data.json").write_text(json.dumps(learned) + "\n", encoding="utf-8")
    result = trainer.fit(data)
    if not acc.is_main_process:
        return
    device = torch.device("cpu") if acc.device.type == "cpu" else acc.device
    print(f"\ntrained to step {result.step}; checkpoint: {ckpt} (genkit.load it; model.sample(n) is one step)")
    if table_data is None:
        return
    trained = genkit.load(ckpt, map_location=device)  # EMA weights, as a user would load them
    table = evaluate(args, trained, teacher.to(device), table_data, device)
    t_steps = teacher_steps(args.teacher)
    steps = {"student": result.step, "teacher": t_steps, "ratio": None if not t_steps else result.step / t_steps}
    payload = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
               "training_steps": steps, **table}
    (Path(args.out) / "distill_table.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    text = markdown(args, table, steps)
    (Path(args.out) / "distill_table.md").write_text(text, encoding="utf-8")
    print("\n" + text + f"\ntable: {Path(args.out) / 'distill_table.md'} (and .json)")


if __name__ == "__main__":
    sys.exit(run_main(main))
