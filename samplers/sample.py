"""Draw samples from a genkit checkpoint with any solver, grid and step budget.

Writes OUT/samples.safetensors (tensor key "samples", [n, *sample_shape]) and OUT/samples.png (a scatter
for vectors, an image grid for images, per-position token frequencies for token sequences) and prints the number
of network evaluations (NFE) and the time. A token model (mdlm) whose alphabet is known (its run's
train_data.json: train.py --tokens FILE [--alphabet ACGT], or a named set such as motifs; else --alphabet) also
gets its samples as sequences: OUT/samples.fasta when it was trained on a FASTA file, else OUT/samples.txt
(one sequence per line), both readable by genkit.data.load_tokens.
Results are reproducible: --seed fixes the prior draw and any solver noise.

examples:
  python samplers/sample.py --checkpoint runs/default
  python samplers/sample.py --checkpoint runs/default/checkpoint --solver euler --steps 8 --grid karras
  python samplers/sample.py --checkpoint runs/digits --n 64 --device cuda --out runs/digits/heun32
  python samplers/sample.py --checkpoint runs/secant --steps 4   # a train/secant.py model: its 4 learned jumps
  python samplers/sample.py --checkpoint runs/meanflow            # a one-step model: 1 learned jump, NFE 1
  python samplers/sample.py --checkpoint runs/meanflow --steps 2  # 2 learned jumps, NFE 2
  python samplers/sample.py --checkpoint runs/smt --solver restart --steps 2   # SMT / SMD: 2 steps, fresh noise
  python samplers/sample.py --checkpoint runs/digits_cond --class 3 --guidance 2.0   # classifier-free guidance
  python samplers/sample.py --checkpoint runs/nsf_moons --n 1000   # a normalizing flow: its exact sampler, NFE 1
  python samplers/sample.py --checkpoint runs/snf_dw --n 1000      # a stochastic flow: its path sampler
  python samplers/sample.py --checkpoint runs/promoters --n 100   # train.py --tokens x.fasta: samples.fasta too
  python samplers/sample.py --checkpoint runs/dna --solver svdd --reward dna_oracle --candidates 10
  python samplers/sample.py --checkpoint runs/gflownet --n 10000   # a GFlowNet: candidates from its policy

Each model samples with its own default sampler unless told otherwise (the model says which it supports):
models with learned jumps (train/secant.py) use them (--solver jumps, NFE = steps, default their first trained
step count); any ODE solver still integrates their velocity view (--solver heun ...). Normalizing flows (nsf,
realnvp) sample exactly, one pass through their inverse (--solver exact; --steps / --grid / --t-max are refused);
a stochastic normalizing flow (snf) in one pass through its flow layers and stochastic blocks, the blocks' noise
from --seed (--solver path, NFE = the target-energy evaluations along the path; the same refusals).

The one-step models MeanFlow, SMT and SMD (--family meanflow / smt / smd) sample with 1 learned jump by default
(NFE 1); --steps k takes k jumps, uniform in t (NFE k). Jumps are uniform in t, so --grid and --t-max are refused
with them. MeanFlow's network at r = t is a velocity, so ODE solvers run on it too (--solver heun ...); SMT and
SMD have no velocity view (an ODE solver is a ConfigError) but a restart sampler (--solver restart --steps k:
denoise, re-noise with fresh noise from --seed, k times). An SMD checkpoint samples without its teacher, which
is never saved.

A masked diffusion model (mdlm) steers toward a reward without fine-tuning through SVDD (--solver svdd --reward
SPEC [--candidates M] [--svdd-alpha A], genkit.finetune.SVDDSampler): at each of --steps reverse steps it draws M
candidates and keeps one by their values (NFE 1 + (steps - 1) * M; the reward is queried M times per step). A
continuous model steers the same way over the Gaussian steps of a stochastic solver (--svdd-solver, default
ancestral for diffusion, euler_maruyama otherwise), each candidate valued by the reward of its denoised x0.

A GFlowNet (--family gflownet) draws candidates, the terminal objects of its forward policy (--solver policy, NFE =
the actions of the longest trajectory; --steps / --grid / --t-max are refused), and prints how they score against
its target: on an enumerable environment their empirical and the policy's exact L1 to R / Z (model.target_report).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import genkit
from genkit.cli import (
    checkpoint_dir,
    named_grids,
    resolve_sampler,
    run_main,
    save_picture,
    script_device,
    target_summary,
    trained_data,
)
from genkit.data.sequences import TOKEN_ALPHABETS, save_tokens
from genkit.errors import ConfigError
from genkit.sampling import SAMPLERS
from genkit.solvers import SOLVERS

# --solver names an ODE solver (the "ode" sampler's) or one of the other samplers, e.g. jumps
NAMED_SAMPLERS = [name for name in SAMPLERS.names() if name != "ode"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=_Formatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint folder, or a train.py run folder holding checkpoint/")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--solver", help=f"one of {', '.join(SOLVERS.names())}, a searched solver saved by name "
                                    "(search_solver.py --name) or its folder (--out), or a sampler: "
                                    f"{', '.join(NAMED_SAMPLERS)} (jumps: the learned jumps of a secant, "
                                    "meanflow, smt or smd model; restart: smt / smd re-noised steps) "
                                    "(default: the model's default sampler: jumps for models that have them, "
                                    "1 jump for the one-step models meanflow / smt / smd, else heun)")
    p.add_argument("--steps", type=int, help="solver steps (adaptive solvers choose their own) or jumps (default: 32 "
                                             "solver steps; a searched solver's own N; a secant model's first "
                                             "trained step count; 1 jump for meanflow / smt / smd, --steps k for "
                                             "k jumps)")
    p.add_argument("--grid", help=f"time grid of a solver, one of {', '.join(named_grids())} (default: uniform "
                                  "over the model's time range; a searched solver runs on its own times and jumps "
                                  "are uniform in t, so --grid is refused there)")
    p.add_argument("--t-max", type=float, metavar="T",
                   help="start the solver at t = T < 1 (default: the model's start; a stochastic solver whose "
                        "reverse SDE is singular there, e.g. euler_maruyama on flow matching, starts at 0.99 and "
                        "says so)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draw and solver noise")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: samples_SOLVERSTEPS_GRID/ next to the checkpoint folder; "
                        "samples_jumpsK/ or samples_restartK/ for K jumps or restart steps; samples_exact/ or "
                        "samples_path/ for a flow)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--alphabet", metavar="LETTERS",
                   help="a token model: write its samples as sequences over LETTERS (id i = LETTERS[i]) too "
                        "(default: the alphabet its run recorded in train_data.json, if any)")
    g = p.add_argument_group("class-conditional models")
    g.add_argument("--class", dest="class_label", metavar="C",
                   help="sample this class (its id, or its name when the checkpoint records class names)")
    g.add_argument("--guidance", type=float, metavar="S",
                   help="classifier-free guidance scale (0 unconditional, 1 conditional; needs --class)")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"),
                   help="guide only for T_LO < t <= T_HI (Kynkaanniemi et al. 2024), conditional elsewhere")
    g.add_argument("--guidance-rescale", type=float, metavar="PHI",
                   help="rescaled guidance phi in [0, 1] (Lin et al. 2023; 0.7 in the paper)")
    g = p.add_argument_group("reward-guided sampling (--solver svdd: soft value-based decoding, no fine-tuning)")
    g.add_argument("--reward", metavar="SPEC", help="the reward: a registered name (genkit.finetune.oracles.REWARDS, "
                                                    "e.g. dna_oracle), module:attribute or path/to/file.py:attribute")
    g.add_argument("--candidates", type=int, metavar="M", help="candidates per sample and step (10)")
    g.add_argument("--svdd-alpha", type=float, metavar="A",
                   help="selection temperature: 0 keeps the best candidate (the papers' DNA setting), inf a uniform "
                        "one (0)")
    g.add_argument("--svdd-solver", metavar="NAME",
                   help="a continuous model: the stochastic solver whose Gaussian steps draw the candidates "
                        "(default: ancestral for diffusion, euler_maruyama otherwise); --steps, --grid, --t-max "
                        "set its grid as for any solver")
    return p.parse_args(argv)


def svdd_sampler(args: argparse.Namespace, model: Any, chosen: Any) -> Any:
    """The SVDD sampler of --solver svdd --reward ... (None for another solver; its flags without it are a
    ConfigError): a masked model's over its ancestral steps, a continuous model's over the Gaussian steps of
    --svdd-solver on the grid ``chosen`` (resolve_sampler's) sets."""
    given = [f for f, v in (("--reward", args.reward), ("--candidates", args.candidates),
                            ("--svdd-alpha", args.svdd_alpha), ("--svdd-solver", args.svdd_solver)) if v is not None]
    if args.solver != "svdd":
        if given:
            raise ConfigError(f"{' and '.join(given)} only apply to --solver svdd (reward-guided sampling); add "
                              "--solver svdd or drop them")
        return None
    if args.reward is None:
        raise ConfigError("--solver svdd needs --reward SPEC: a registered name (e.g. dna_oracle), "
                          "module:attribute or path/to/file.py:attribute")
    from genkit.finetune import SVDDSampler
    from genkit.finetune.oracles import get_reward

    options = {k: v for k, v in (("candidates", args.candidates), ("alpha", args.svdd_alpha)) if v is not None}
    if getattr(model, "discrete", False):
        if args.svdd_solver is not None:
            raise ConfigError(f"--svdd-solver {args.svdd_solver}: a {model.family!r} model draws its candidates from "
                              "its own reverse steps; drop --svdd-solver")
        return SVDDSampler(get_reward(args.reward), steps=args.steps, **options)
    return SVDDSampler(get_reward(args.reward), steps=chosen.steps, solver=chosen.sampler.solver,
                       grid=chosen.sampler.grid, **options)


def class_and_guidance(args: argparse.Namespace, model: torch.nn.Module, ckpt: Path) -> dict:
    """--class / --guidance* as model.sample's labels= and guidance= (empty without them)."""
    if args.class_label is None:
        extra = [f for f, v in (("--guidance", args.guidance), ("--guidance-interval", args.guidance_interval),
                                ("--guidance-rescale", args.guidance_rescale)) if v is not None]
        if extra:
            raise ConfigError(f"{' and '.join(extra)} need --class: guidance pushes samples towards a class")
        return {}
    if getattr(model, "num_classes", None) is None:
        raise ConfigError(f"--class {args.class_label}: {ckpt} holds an unconditional {model.family!r} model; "
                          "--class needs a class-conditional model (num_classes set)")
    names = list(getattr(model, "class_names", None) or [])
    if args.class_label in names:
        label = names.index(args.class_label)
    elif args.class_label.lstrip("-").isdigit():
        label = int(args.class_label)
    else:
        raise ConfigError(f"--class {args.class_label!r} is neither a class id (0..{model.num_classes - 1}) nor a "
                          f"class name of {ckpt}" + (f" ({', '.join(names)})" if names else " (it records none)"))
    if not 0 <= label < model.num_classes:
        raise ConfigError(f"--class {label} is out of range: {ckpt} has classes 0..{model.num_classes - 1}")
    if args.guidance is None:
        if args.guidance_interval is not None or args.guidance_rescale is not None:
            raise ConfigError("--guidance-interval and --guidance-rescale shape the guidance: give --guidance too")
        return {"labels": label}
    if getattr(model, "null_label", None) is None:
        raise ConfigError(f"--guidance needs a model trained with class dropout (a null label); {ckpt} has none. "
                          "Drop --guidance to sample the class without guidance.")
    guidance = genkit.Guidance(args.guidance, interval=None if args.guidance_interval is None
                               else tuple(args.guidance_interval), rescale=args.guidance_rescale or 0.0)
    return {"labels": label, "guidance": guidance}


def token_alphabet(args: argparse.Namespace, model: torch.nn.Module, ckpt: Path) -> tuple[str | None, str]:
    """``(alphabet, file name)`` for a token model's samples as sequences: --alphabet, else the one its run
    recorded (train_data.json: a --tokens file's, or a named set's), else None; samples.fasta after a FASTA file,
    else samples.txt. --alphabet on a model of real-valued samples is a ConfigError."""
    record = trained_data(ckpt) or {}
    name = "samples.fasta" if record.get("format") == "fasta" else "samples.txt"
    vocab = getattr(model, "vocab_size", None)
    if not getattr(model, "discrete", False) or vocab is None:
        if args.alphabet is not None:
            raise ConfigError(f"--alphabet {args.alphabet}: {ckpt} holds a {model.family!r} model of real-valued "
                              "samples, not tokens; drop --alphabet")
        return None, name
    alphabet = args.alphabet or record.get("alphabet") or TOKEN_ALPHABETS.get(record.get("data"))
    if alphabet is not None and len(alphabet) != vocab:
        where = "--alphabet" if args.alphabet else f"the alphabet recorded in {ckpt.parent / 'train_data.json'}"
        raise ConfigError(f"{where} {alphabet!r} has {len(alphabet)} letters but {ckpt} models {vocab} tokens; pass "
                          f"--alphabet with {vocab} letters (id i = LETTERS[i])")
    return alphabet, name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.n < 1:
        raise ConfigError(f"--n must be a positive integer; got {args.n}")
    device = script_device(args.device)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer; got {args.steps}")
    ckpt = checkpoint_dir(args.checkpoint)
    model = genkit.load(ckpt, ema=not args.raw_weights, map_location=device)
    alphabet, text_name = token_alphabet(args, model, ckpt)  # before sampling: a wrong --alphabet fails now
    solver = args.solver
    if solver == "svdd":  # SVDD reweights a stochastic sampler's steps: a masked model's own, else --svdd-solver
        solver = None if getattr(model, "discrete", False) else (
            args.svdd_solver or ("ancestral" if model.family == "diffusion" else "euler_maruyama"))
    chosen = resolve_sampler(model, solver, args.steps, args.grid, args.t_max)
    if chosen.note:
        print(f"note: {chosen.note}")
    sampler, label, how = chosen.sampler, chosen.solver, chosen.describe()
    svdd = svdd_sampler(args, model, chosen)
    if svdd is not None:
        sampler, label, how = svdd, "svdd", svdd.describe()
    args.steps, args.grid = chosen.steps, chosen.grid
    conditioning = class_and_guidance(args, model, ckpt)
    tag = ""
    if conditioning:
        how += f", class {conditioning['labels']}"
        tag = f"_class{conditioning['labels']}"
        if "guidance" in conditioning:
            how += f", guidance {args.guidance:g}"
            tag += f"_cfg{args.guidance:g}"
    start = f"_tmax{chosen.t_range[0]:g}" if chosen.t_range is not None and chosen.t_range[0] < 1 else ""
    if chosen.kind not in ("ODE solver", "SDE solver"):  # jumps / restart are uniform in t, flows have no grid
        start = ""  # a one-step model's top time (SMD: the teacher's t_max) is not a --t-max
    grid_part = "" if chosen.kind not in ("ODE solver", "SDE solver") or args.grid is None else f"_{args.grid}"
    name = f"samples_{Path(label).name}{args.steps if args.steps is not None else ''}{grid_part}{start}{tag}"
    out = Path(args.out) if args.out else ckpt.parent / name
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sol = model.sample(args.n, sampler=sampler, return_solution=True, generator=gen, **conditioning)
    samples = sol.samples.cpu().contiguous()  # .cpu() waits for the GPU, so the time is honest
    samples = samples.float() if samples.is_floating_point() else samples  # token ids stay long
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_file({"samples": samples}, str(out / "samples.safetensors"))
    weights = "EMA" if not args.raw_weights and (ckpt / "ema.safetensors").is_file() else "raw"
    save_picture(model, samples, out / "samples.png", title=f"{model.family}: {how} (NFE {sol.nfe})")
    print(f"{args.n} samples {tuple(samples.shape[1:])} from {ckpt} ({weights} weights) with {how} on {device}: "
          f"NFE {sol.nfe}, {seconds:.2f} s")
    print(f"samples: {out / 'samples.safetensors'}\npicture: {out / 'samples.png'}")
    if alphabet is not None:
        print(f"sequences: {save_tokens(out / text_name, samples, alphabet)} (alphabet {alphabet})")
    if callable(getattr(model, "target_report", None)):  # a GFlowNet's candidates: against its exact target
        print(f"candidates: {target_summary(model.target_report(samples))}")


if __name__ == "__main__":
    sys.exit(run_main(main))
