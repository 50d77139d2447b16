"""Train a model of any registered family (flow matching, diffusion, secant, the normalizing flows nsf and
realnvp, the stochastic normalizing flow snf, ...), then sample from its checkpoint and measure the samples (a
flow trained by --energy: its importance weights against the energy, ESS and log Z).

With no arguments it runs the embedded default: flow matching (linear path, MLP 128 x 3) on the 2-D
`moons` set, 1500 steps of batch 256 (well under a minute on a laptop CPU), then 2000 samples with
heun at 32 steps. The out dir (--out) ends up holding:

  checkpoint/     safetensors weights + EMA + JSON config (resume state included)
  metrics.jsonl   training log (loss, lr, grad norm, throughput)
  samples.png     samples next to held-out data (scatter for vectors, image grid for images, per-position
                  token frequencies for token sequences)
  samples.txt     token sequences with a known alphabet (--tokens FILE, motifs): the samples as text, one a
                  line (samples.fasta after a FASTA file)
  metrics.json    sample quality against held-out data, with the noise floor of a second held-out draw (an
                  --energy run: ESS and log Z of its importance weights, and with --samples FILE also the
                  held-out NLL and distances to the file's held-out samples)
  samples/        step_XXXXXXX.png every --sample-every steps (when asked)

Re-running with the same --out RESUMES from its checkpoint and continues the run exactly (raise --steps to
train longer: the LR schedule is then recomputed for the new total); flags that would change the run (lr,
batch size, seed, EMA, data, ...) are an error there unless --allow-new-settings; use a new --out to start
afresh. Ctrl-C or SIGTERM (a cluster's preemption) saves a checkpoint after the current step before exiting;
Ctrl-C during the final sampling exits saying the (complete) checkpoint is safe. A non-empty --out that is not a
run is refused. The final sampling's flags (--solver, --sample-steps, --grid, --t-max) are resolved as in every
script (genkit.cli.resolve_sampler) and tried on the untrained model before training starts.

Each family brings its own flags (listed in a group of their own below); a flag of another family is an error.
All flags can come from a file too: --config run.json or run.toml holds {flag: value} with the flags' names
(batch_size or batch-size); flags on the command line override the file, and an unknown key is an error.

Multi-GPU / multi-process: `accelerate launch --multi_gpu --num_processes N
train/train.py ...` or `torchrun --nproc_per_node N train/train.py ...`; on a machine without a GPU both run N
CPU processes over gloo (`accelerate launch --cpu --num_processes N` starts only one). --batch-size is per
process; only the main process samples and writes files.

examples:
  python train/train.py
  python train/train.py --data checkerboard --coupling ot --out runs/checker
  python train/train.py --family diffusion --path cosine --prediction v --weighting min_snr --data spirals
  python train/train.py --family diffusion --data digits --channels 32,64 --steps 4000 --batch-size 128
  python train/train.py --family secant --loss stee --jumps 1,2,4 --data moons
  python train/train.py --data digits --conditional --class-dropout 0.1 --steps 3000
  python train/train.py --family nsf --data wine --layers 6 --out runs/nsf_wine
  python train/train.py --family realnvp --table my_table.csv --out runs/realnvp_table
  python train/train.py --family nsf --energy double_well --out runs/nsf_dw   # data-free: the reverse KL
  python train/train.py --family snf --energy double_well --blocks metropolis --block-steps 5 --out runs/snf_dw
  python train/train.py --family snf --energy double_well --objective mixed --samples md_samples.npy
  python train/train.py --family mdlm --data motifs --net sequence_transformer --hidden 64 --depth 2
  python train/train.py --family masked_diffusion --tokens promoters.fasta --alphabet ACGT --out runs/promoters
  python train/train.py --config run.toml --steps 3000
  accelerate launch train/train.py --image-folder ~/faces --image-size 64 --channels 64,128,256
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import genkit
from genkit import checkpoint, metrics
from genkit.cli import (
    SAMPLES_SPLIT_SEED,
    HelpFormatter,
    energy_metrics,
    held_out_nll,
    run_main,
    samples_held_out,
    table_held_out,
    tokens_held_out,
)
from genkit.data import (
    COMPONENTS,
    DATASETS,
    TABULAR,
    LabelledData,
    digits,
    digits_labels,
    held_out,
    image_folder,
    load_dataset,
    load_labelled,
    load_table,
    load_tokens,
    token_file_format,
)
from genkit.data.sequences import TOKEN_ALPHABETS, TOKEN_HOLDOUT, save_tokens
from genkit.energies import energy_from_config
from genkit.errors import ConfigError, ShapeError
from genkit.models import FAMILIES, build
from genkit.nets import MLP, UNet
from genkit.objective import is_data_free
from genkit.paths import PATHS
from genkit.plotting import MAX_IMAGES
from genkit.sampling import SAMPLERS, Sampler
from genkit.solvers import GRIDS, SOLVERS
from genkit.train import LogRecord, TrainConfig, Trainer, resume_changes

NAMED_GRIDS = [name for name in GRIDS.names() if name != "custom"]  # a custom grid needs explicit times
NAMED_SAMPLERS = [name for name in SAMPLERS.names() if name != "ode"]  # --solver names these, or an ODE solver
FAMILY_FLAGS: dict[str, list[str]] = {}  # family -> the dests of its own flags (filled by build_parser)


def optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


#: --steps / --batch-size / --lr where neither the command line nor the family's ``train_defaults`` set them
TRAIN_DEFAULTS = {"steps": 1500, "batch_size": 256, "lr": 2e-3}


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags: the shared ones, then one group per registered family with that family's own flags
    (recorded in FAMILY_FLAGS, so that a flag given to another family is caught)."""
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="FILE", help="read flags from a .json or .toml file ({flag: value}); "
                                                    "command-line flags override it")
    g = p.add_argument_group("model")
    aliases = ", ".join(f"{alias} = {name}" for alias, name in FAMILIES.aliases().items())
    g.add_argument("--family", default="flow_matching", help=f"one of {', '.join(FAMILIES.names())}"
                                                             + (f" (aliases: {aliases})" if aliases else ""))
    paths = ", ".join(f"{cls.cli_defaults['path']} for {name}" for name, cls in _families()
                      if "path" in getattr(cls, "cli_defaults", {}))
    g.add_argument("--path", help=f"probability path, one of {', '.join(PATHS.names())} (default: {paths})")
    g.add_argument("--hidden", type=int, help="vector data: MLP width (default: 128)")
    g.add_argument("--depth", type=int, help="vector data: MLP residual blocks (default: 3)")
    g.add_argument("--channels", help="image data: UNet block_out_channels, comma separated, each a multiple "
                                      "of 8 (default: 32,64)")
    g = p.add_argument_group("data (vectors get an MLP, images a diffusers UNet)")
    g.add_argument("--data", help=f"a named data set, one of {', '.join(DATASETS.names())} (default: moons)")
    g.add_argument("--image-folder", metavar="PATH", help="train on your own images instead: a folder of images "
                                                          "or of one subfolder per class (every file is checked first)")
    g.add_argument("--table", metavar="FILE",
                   help="train on your own table instead: a .csv (numbers, an optional header) or .npy [rows, "
                        "columns], split 70/10/20 and standardised with its train split (genkit.data.load_table); "
                        "the test split is held out")
    g.add_argument("--samples", metavar="FILE",
                   help="with --energy, for an objective that trains on samples of its target (not data-free: "
                        "--family snf --objective ml or mixed): a .csv or .npy [N, D] of samples of exp(-U) (MD, "
                        "MCMC) in the energy's own coordinates, not standardised; split 70/10/20 by a permutation "
                        "seeded by 0 (whatever --seed), trained on the train split, the test split held out for the "
                        "final held-out NLL and distances and for eval/evaluate.py")
    g.add_argument("--tokens", metavar="FILE",
                   help="train a token family (mdlm) on your own sequences instead: a FASTA file (.fa/.fasta/.fna, "
                        "or '>' headers; upper-cased), a text file of one sequence per line, or a .npy of token ids "
                        "[N, L]; all of one length. A fixed 10%% of the sequences (a permutation seeded by 0, "
                        "whatever --seed) is held out for the final metrics and eval/evaluate.py")
    g.add_argument("--alphabet", metavar="LETTERS",
                   help="with --tokens (text or FASTA): the token letters, id i = LETTERS[i], e.g. ACGT (default: "
                        "the sorted letters of the file); recorded in the run, so samplers/sample.py writes its "
                        "samples as sequences")
    g.add_argument("--image-size", type=int, metavar="N", help="with --image-folder: resize and centre-crop to N x N")
    g.add_argument("--image-channels", type=int, help="with --image-folder: 1 (grey) or 3 (RGB) (default: 3)")
    g.add_argument("--num-workers", type=int, default=0, help="data-loading processes for --image-folder")
    g.add_argument("--conditional", action="store_true",
                   help="train a class-conditional model on the data's classes: digits' digits, a tabular set's "
                        f"classes ({', '.join(TABULAR)}), an image folder's class subfolders, a toy set's components "
                        f"({', '.join(COMPONENTS)}); sample it with "
                        "samplers/sample.py --class C --guidance S")
    g.add_argument("--class-dropout", type=float, metavar="P",
                   help="with --conditional: probability of training on the null label instead of the class, what "
                        "classifier-free guidance needs (default: 0.1; 0 trains no null label, so no guidance; "
                        "a normalizing flow takes none: 0)")
    g = p.add_argument_group("training")
    own = "; ".join(f"{name} {', '.join(f'{k} {v}' for k, v in cls.train_defaults.items())}"
                    for name, cls in _families() if getattr(cls, "train_defaults", None))
    g.add_argument("--steps", type=int, help=f"total optimizer steps (a resumed run continues to it; default: "
                                             f"{TRAIN_DEFAULTS['steps']}, or the family's own: {own})")
    g.add_argument("--batch-size", type=int, help=f"per process (default: {TRAIN_DEFAULTS['batch_size']}, or the "
                                                  "family's own)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (AdamW, cosine decay; default: "
                                            f"{TRAIN_DEFAULTS['lr']}, or the family's own)")
    g.add_argument("--warmup", type=int, help="linear warm-up steps (default: min(100, steps // 10))")
    g.add_argument("--ema-decay", type=optional_float, default=0.999, help="EMA decay, or 'none'")
    g.add_argument("--grad-clip", type=optional_float, default=1.0, help="max gradient norm, or 'none'")
    g.add_argument("--mixed-precision", default="no", help="no, bf16 or fp16")
    g.add_argument("--nonfinite", default="stop", help="on a NaN/inf loss: stop, or skip the step")
    g.add_argument("--seed", type=int, default=0, help="seeds data, initialisation, training noise and sampling")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    g.add_argument("--sample-every", type=int, default=0, metavar="N",
                   help="write out/samples/step_N.png every N steps (0: never)")
    g.add_argument("--log-every", type=int, metavar="N", help="steps between log lines in metrics.jsonl and the "
                                                              "progress bar (default: 50, or a divisor of "
                                                              "--sample-every)")
    g.add_argument("--out", default="runs/default", help="run directory; an existing one is resumed")
    g.add_argument("--allow-new-settings", action="store_true",
                   help="resume a run in --out even though flags that change the run (lr, batch size, seed, EMA, "
                        "data, ...) differ from its own")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 for vector data, whose small MLP "
                                               "only loses time to threading; torch's own choice for images)")
    g = p.add_argument_group("final sampling and metrics")
    g.add_argument("--solver", help=f"one of {', '.join(SOLVERS.names())}, a searched solver saved by name or its "
                                    f"folder, or a sampler: {', '.join(NAMED_SAMPLERS)} (default: the model's "
                                    "default sampler: heun for flow matching and diffusion, the learned jumps of a "
                                    "secant model); checked on the untrained model before training starts")
    g.add_argument("--sample-steps", type=int, help="solver steps or jumps (default: 32 solver steps; a searched "
                                                    "solver's own N; a jump model's first trained step count)")
    g.add_argument("--grid", help=f"time grid of an ODE solver, one of {', '.join(NAMED_GRIDS)} (default: uniform; "
                                  "refused where the sampler runs on its own times)")
    g.add_argument("--t-max", type=float, metavar="T",
                   help="start the solver at t = T (default: the model's start; a stochastic solver whose reverse "
                        "SDE is singular there, e.g. euler_maruyama on flow matching, starts at 0.99 and says so)")
    g.add_argument("--n-samples", type=int, help="samples drawn at the end (default: 2000 for vectors, 256 for images)")
    FAMILY_FLAGS.clear()
    declared: dict[str, tuple[str, argparse.Action]] = {}  # a family flag's option -> (first family, its action)
    for name, cls in _families():
        group = _FamilyGroup(p.add_argument_group(f"{name} (--family {name})"), name, declared)
        try:
            cls.add_arguments(group)
        except argparse.ArgumentError as e:
            raise ConfigError(f"family {name!r} declares a flag train.py or another family already has ({e}); "
                              "rename it in its add_arguments") from None
        FAMILY_FLAGS[name] = [action.dest for action in group.actions]
        if group.shared:
            group.group.description = (f"also {', '.join(group.shared)}, as for --family {group.shared_with[0]}")
        defaults = [a.dest for a in group.actions if a.default is not None]
        if defaults:
            raise ConfigError(f"family {name!r}'s flags {defaults} have argparse defaults; declare them in its "
                              "cli_defaults, so that a flag set for another family can be caught")
    return p


class _FamilyGroup:
    """A family's argument group in which a flag an earlier family declared alike (same option, type and dest:
    nsf and realnvp both take --layers) is shared, not a conflict; ``actions`` are the family's flags, shared
    ones included. A flag declared differently is an argparse conflict, as before."""

    def __init__(self, group: argparse._ArgumentGroup, family: str,
                 declared: dict[str, tuple[str, argparse.Action]]):
        self.group, self.family, self.declared, self.actions = group, family, declared, []
        self.shared: list[str] = []  # the flags it shares with an earlier family, and which
        self.shared_with: list[str] = []

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        first = self.declared.get(names[0]) if names else None
        if first is not None:
            action = first[1]
            dest = kwargs.get("dest", names[0].lstrip("-").replace("-", "_"))
            if action.option_strings == list(names) and action.dest == dest and action.type is kwargs.get("type"):
                own_help = kwargs.get("help")
                if own_help and own_help != action.help:  # one flag, two meanings: the help gives both
                    action.help = f"--family {first[0]}: {action.help}; --family {self.family}: {own_help}"
                self.actions.append(action)
                self.shared.append(names[0])
                self.shared_with.append(first[0])
                return action
        action = self.group.add_argument(*names, **kwargs)
        for option in action.option_strings:
            self.declared[option] = (self.family, action)
        self.actions.append(action)
        return action

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)


def _families() -> list[tuple[str, Any]]:
    """The registered families that declare train.py flags (``add_arguments``)."""
    return [(name, FAMILIES.get(name)) for name in FAMILIES.names()
            if callable(getattr(FAMILIES.get(name), "add_arguments", None))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    first, _ = p.parse_known_args(argv)
    if first.config is not None:
        p.set_defaults(**read_config_file(first.config, p))
    return p.parse_args(argv)


def read_config_file(file: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``{dest: value}`` from a .json or .toml file of flags (``batch_size = 256`` or ``"batch-size": 256``),
    each value checked by its flag's type; an unknown key is a ConfigError listing the known ones."""
    path = Path(file)
    try:
        if path.suffix == ".toml":
            with path.open("rb") as f:
                raw = tomllib.load(f)
        elif path.suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"--config {file}: use a .json or .toml file")
    except (OSError, ValueError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"--config {file}: cannot read it ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {file} must hold a table of flags {{flag: value}}; got {type(raw).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dest = str(key).removeprefix("--").replace("-", "_")
        if dest not in actions:
            raise ConfigError(f"--config {file}: unknown key {key!r}; known keys: {', '.join(sorted(actions))}")
        action = actions[dest]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"--config {file}: {key} must be true or false; got {value!r}")
        elif value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            try:
                value = action.type(text) if action.type is not None else text
            except (TypeError, ValueError):
                raise ConfigError(f"--config {file}: {key} = {value!r} is not a valid "
                                  f"{getattr(action.type, '__name__', 'value')}") from None
        values[dest] = value
    return values


# --------------------------------------------------------------------------------------------- settings
def resolve_model_flags(args: argparse.Namespace) -> None:
    """Family-specific flags: reject those the family would ignore, then fill the family's defaults. An alias
    (--family masked_diffusion) becomes the family's own name (mdlm), which the run records."""
    if args.family in FAMILIES:
        args.family = FAMILIES.canonical(args.family)
    if args.family not in FAMILY_FLAGS:
        raise ConfigError(f"unknown --family {args.family!r}; choose one of {', '.join(FAMILY_FLAGS)}")
    own = set(FAMILY_FLAGS[args.family])
    for family, dests in FAMILY_FLAGS.items():
        for dest in dests:
            if family != args.family and dest not in own and getattr(args, dest) is not None:
                flag = "--" + dest.replace("_", "-")
                takers = " or ".join(f"--family {name}" for name, flags in FAMILY_FLAGS.items() if dest in flags)
                raise ConfigError(f"{flag} {getattr(args, dest)} does not apply to --family {args.family}; "
                                  f"drop {flag} or use {takers}")
    for key, value in FAMILIES.get(args.family).cli_defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    own = getattr(FAMILIES.get(args.family), "train_defaults", {})  # e.g. a GFlowNet's batch of 16 trajectories
    for key, value in {**TRAIN_DEFAULTS, **own}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "path" in FAMILIES.get(args.family).cli_defaults:
        genkit.get_path(args.path)  # an unknown name fails now, not after loading data
    elif args.path is not None:
        raise ConfigError(f"--path {args.path} does not apply to --family {args.family}, which has no probability "
                          "path (a normalizing flow maps its base to the data directly); drop --path")
    if args.solver is not None and args.solver not in NAMED_SAMPLERS:
        genkit.get_solver(args.solver)
    if args.grid is not None:
        genkit.get_grid(args.grid)
    for flag in ("sample_steps", "n_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer; got {value}")
    if args.sample_every < 0:
        raise ConfigError(f"--sample-every must be >= 0 (0 turns it off); got {args.sample_every}")
    for flag in ("hidden", "depth", "log_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer; got {value}")
    if args.log_every and args.sample_every and args.sample_every % args.log_every:
        raise ConfigError(f"--sample-every {args.sample_every} must be a multiple of --log-every {args.log_every} "
                          "(pictures are drawn at log steps)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a run directory; pick another --out")
    check_out_is_a_run(out, args.out)
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {args.out}: cannot write under {existing}; pick a writable --out")


#: What a train.py run folder holds; a non-empty --out with none of these is someone else's folder.
RUN_FILES = ("checkpoint", "train_data.json", "metrics.jsonl", "metrics.json", "samples.png", "samples",
             "samples.txt", "samples.fasta")


def check_out_is_a_run(out: Path, flag: str) -> None:
    """A non-empty --out that holds none of a run's files is refused, as genkit.save refuses such a folder:
    resuming or writing there would mix a run into other files."""
    try:
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError:
        return  # unreadable: the writability check says so
    if names and not any(name in RUN_FILES for name in names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(f"--out {flag} is a non-empty folder that is not a train.py run (it holds {shown}); pick "
                          "a new or empty --out")


# TrainConfig fields as train.py's flags, for error messages
FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "warmup_steps": "--warmup",
         "ema_decay": "--ema-decay", "grad_clip": "--grad-clip", "mixed_precision": "--mixed-precision",
         "seed": "--seed", "checkpoint_every": "--checkpoint-every", "log_every": "--log-every",
         "nonfinite": "--nonfinite", "num_workers": "--num-workers"}


def train_config(args: argparse.Namespace) -> TrainConfig:
    warmup = min(100, max(args.steps, 0) // 10) if args.warmup is None else args.warmup
    log_every = args.log_every or (50 if not args.sample_every else math.gcd(50, args.sample_every))
    try:
        return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=warmup,
                           ema_decay=args.ema_decay, grad_clip=args.grad_clip, mixed_precision=args.mixed_precision,
                           seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=log_every,
                           out_dir=args.out, nonfinite=args.nonfinite, num_workers=args.num_workers,
                           progress=not args.no_progress)
    except ConfigError as e:  # name the flag, not the dataclass field
        text = re.sub(r"(?:TrainConfig\.)?\b(\w+)=", lambda m: f"{FLAGS[m[1]]} " if m[1] in FLAGS else m[0], str(e))
        raise ConfigError(text.replace(" or None", " or 'none'")) from None


def load_data(args: argparse.Namespace) -> tuple[Any, torch.Size]:
    """The training set (a tensor, or a Dataset for image folders, not yet verified) and one sample's shape.
    With --conditional it is a LabelledData, and ``args.num_classes`` / ``args.class_names`` are set."""
    args.num_classes = args.class_names = None
    args.target = None
    own = getattr(FAMILIES.get(args.family), "target_from_args", None)
    if callable(own):  # a data-free family that names its own target (a GFlowNet's environment): no data set
        for flag, value in (("--data", args.data), ("--image-folder", args.image_folder), ("--table", args.table),
                            ("--tokens", args.tokens), ("--samples", args.samples),
                            ("--conditional", args.conditional or None)):
            if value is not None:
                raise ConfigError(f"{flag} names data, but --family {args.family} trains on its own samples (its "
                                  f"{', '.join(own(args)[0])}): drop {flag}")
        args.target, shape = own(args)
        return None, torch.Size(shape)
    energy = getattr(args, "energy", None)
    if energy is not None:  # a family trained by an energy (data-free): no data set
        for flag, value in (("--data", args.data), ("--image-folder", args.image_folder), ("--table", args.table),
                            ("--tokens", args.tokens), ("--conditional", args.conditional or None)):
            if value is not None:
                raise ConfigError(f"{flag} and --energy {energy} both name what to learn; an energy run trains on its "
                                  f"own samples: drop {flag}")
        config = FAMILIES.get(args.family).energy_from_args(args)  # the flow family parses its own flags
        target = energy_from_config(config)
        return _energy_samples(args, target), torch.Size([target.dim])
    if getattr(args, "samples", None) is not None:
        raise ConfigError(f"--samples {args.samples} holds samples of an energy's target and needs --energy NAME "
                          "(with a family objective that trains on them); to train on a table of data use --table "
                          "FILE instead")
    data, shape = _load_samples(args)
    if args.class_dropout is not None and not args.conditional:
        raise ConfigError(f"--class-dropout {args.class_dropout} applies to --conditional training only; add "
                          "--conditional or drop it")
    if not args.conditional:
        return data, shape
    if args.class_dropout is None:  # 0.1 trains the null label guidance needs; a flow family has none (0)
        args.class_dropout = float(getattr(FAMILIES.get(args.family), "default_class_dropout", 0.1))
    if not 0 <= args.class_dropout < 1:
        raise ConfigError(f"--class-dropout must be a probability in [0, 1) (0.1 is usual); got {args.class_dropout}")
    if args.image_folder is not None:
        data = data.labelled()  # its class subfolders (a flat folder is an error naming the fix)
    elif args.data == "digits" or args.data in COMPONENTS or args.data in TABULAR:
        data = load_labelled(args.data, generator=torch.Generator().manual_seed(args.seed))
    else:
        raise ConfigError(f"--conditional needs classes; --data {args.data} has none. Labelled sets: digits, "
                          f"{', '.join(TABULAR)}, {', '.join(COMPONENTS)}, or an --image-folder with one subfolder "
                          "per class")
    args.num_classes, args.class_names = data.num_classes, data.class_names
    return data, shape


def _energy_samples(args: argparse.Namespace, target: Any) -> torch.Tensor | None:
    """The train split of ``--samples FILE`` (in the energy's coordinates, not standardised; split seeded by
    genkit.cli.SAMPLES_SPLIT_SEED), checked against the energy's dimension; None without --samples."""
    if args.samples is None:
        return None
    data = load_table(args.samples, "train", seed=SAMPLES_SPLIT_SEED, standardize=False)
    if data.shape[1] != target.dim:
        raise ShapeError(f"--samples {args.samples} has {data.shape[1]} columns but the energy {target.name!r} is "
                         f"{target.dim}-D; pass samples [N, {target.dim}] of its target, or the energy they come "
                         "from (--energy NAME --energy-options JSON)")
    return data


def check_energy_samples(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """An --energy run gets --samples FILE exactly when its model's objective trains on them (not data_free)."""
    energy = getattr(args, "energy", None)
    if energy is None:
        return
    if is_data_free(model) and args.samples is not None:
        raise ConfigError(f"--samples {args.samples}: this --family {args.family} model trains by --energy {energy} "
                          "alone (data-free: its loss makes its own samples), so it would ignore them; drop "
                          "--samples, or pick an objective that trains on samples (--family snf --objective ml or "
                          "mixed)")
    if not is_data_free(model) and args.samples is None:
        raise ConfigError(f"this --family {args.family} model's objective trains on samples of the target of "
                          f"--energy {energy} (it is not data-free): pass --samples FILE, a .csv or .npy [N, "
                          f"{model.sample_shape[0]}] of samples of exp(-U) in the energy's own coordinates (MD, "
                          "MCMC), or train by the energy alone (--objective kl)")


def _load_samples(args: argparse.Namespace) -> tuple[Any, torch.Size]:
    args.token_alphabet = args.token_format = args.token_vocab = None
    if args.alphabet is not None and args.tokens is None:
        raise ConfigError(f"--alphabet {args.alphabet} applies to --tokens FILE only (a named token set has its own "
                          "alphabet); drop it or add --tokens FILE")
    if args.tokens is not None:
        for flag, value in (("--data", args.data), ("--table", args.table), ("--image-folder", args.image_folder)):
            if value is not None:
                raise ConfigError(f"{flag} {value} and --tokens {args.tokens} both name the training data; keep one")
        if args.conditional:
            raise ConfigError(f"--conditional needs classes; the token file {args.tokens} has none; drop "
                              "--conditional")
        args.token_format = token_file_format(args.tokens)
        every, args.token_alphabet = load_tokens(args.tokens, args.alphabet)
        data, _ = load_tokens(args.tokens, args.token_alphabet, split="train", holdout=TOKEN_HOLDOUT)
        # the vocabulary of the whole file (its alphabet, or its largest id + 1), not only of the train split: a
        # token only the held-out split holds must still be one the model can score
        args.token_vocab = len(args.token_alphabet) if args.token_alphabet is not None else int(every.max()) + 1
        return data, data.shape[1:]
    if args.table is not None:
        for flag, value in (("--data", args.data), ("--image-folder", args.image_folder)):
            if value is not None:
                raise ConfigError(f"{flag} {value} and --table {args.table} both name the training data; keep one")
        if args.conditional:
            raise ConfigError(f"--conditional needs classes; the table {args.table} has none (use --data wine, "
                              "breast_cancer or digits64 for labelled tables)")
        data = load_table(args.table, "train", seed=args.seed)
        return data, data.shape[1:]
    if args.image_folder is not None:
        if args.data is not None:
            raise ConfigError(f"--data {args.data} and --image-folder both name the training data; keep one")
        if args.image_size is None:
            raise ConfigError("--image-folder needs --image-size N (images are resized and centre-cropped to N x N)")
        channels = 3 if args.image_channels is None else args.image_channels
        data = image_folder(args.image_folder, args.image_size, channels=channels)
        return data, torch.Size([channels, args.image_size, args.image_size])  # no file is opened before verify
    for flag in ("image_size", "image_channels"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to --image-folder only; drop it or add "
                              "--image-folder PATH")
    if args.num_workers:
        raise ConfigError(f"--num-workers {args.num_workers} applies to --image-folder only (named data sets are "
                          "tensors, indexed in place); drop it")
    args.data = args.data or "moons"
    data = load_dataset(args.data, generator=torch.Generator().manual_seed(args.seed))
    return data, data.shape[1:]


def check_data_kind(args: argparse.Namespace, data: Any) -> None:
    """The family's ``prepare_data(args, data)`` hook where it has one (a token family checks that the data are
    token ids and reads their vocabulary); else token data (integer tensors) are a ConfigError, as a family
    without the hook learns real-valued data."""
    family = FAMILIES.get(args.family)
    prepare = getattr(family, "prepare_data", None)
    if callable(prepare):
        prepare(args, data)
        if getattr(args, "token_vocab", None) is not None and getattr(args, "vocab_size", None) is not None:
            args.vocab_size = max(args.vocab_size, args.token_vocab)  # --tokens: the whole file's vocabulary
        return
    x = getattr(data, "data", data)
    if torch.is_tensor(x) and not x.is_floating_point():
        tokens = [name for name, cls in _families() if callable(getattr(cls, "prepare_data", None))]
        what = f"--tokens {args.tokens}" if args.tokens is not None else f"--data {args.data}"
        raise ConfigError(f"{what} holds token ids ({x.dtype}), which --family {args.family} cannot "
                          f"learn (it models real-valued data); use --family {' or '.join(tokens) or 'mdlm'}")


def build_model(args: argparse.Namespace, shape: torch.Size) -> torch.nn.Module:
    """MLP for vectors, UNet for images, read through the chosen family (which builds itself from the flags)."""
    family = FAMILIES.get(args.family)
    if not getattr(family, "needs_net", True):  # the family builds its own networks (a normalizing flow)
        if args.channels is not None:
            raise ConfigError(f"--channels sets a UNet; --family {args.family} builds its own networks "
                              "(--hidden / --depth set their width and depth)")
        net = None
    elif len(shape) == 1:
        if args.channels is not None:
            raise ConfigError("--channels sets the UNet of image data; this data is vectors, use --hidden/--depth")
        net = MLP(shape[0], hidden=128 if args.hidden is None else args.hidden,
                  depth=3 if args.depth is None else args.depth, num_classes=net_classes(args),
                  **family.net_options(args, "mlp"))
    elif len(shape) == 3:
        for flag in ("hidden", "depth"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag} sets the MLP of vector data; this data is images, use --channels")
        try:
            channels = [int(c) for c in (args.channels or "32,64").split(",")]
        except ValueError:
            raise ConfigError(f"--channels must be comma-separated integers like 32,64; got {args.channels!r}"
                              ) from None
        net = UNet(shape[-1], in_channels=shape[0], block_out_channels=channels, num_classes=net_classes(args),
                   **family.net_options(args, "unet"))
    else:
        raise ConfigError(f"samples of shape {tuple(shape)} are neither vectors nor images [C, H, W]")
    model = family.from_args(args, net, shape)
    if getattr(args, "num_classes", None) is not None and getattr(model, "num_classes", None) != args.num_classes:
        raise ConfigError(f"--family {args.family} does not train class-conditional models; drop --conditional or "
                          "use --family flow_matching or diffusion")
    return model


def net_classes(args: argparse.Namespace) -> int | None:
    """The network's class count under --conditional: K, plus the null label when --class-dropout > 0."""
    k = getattr(args, "num_classes", None)
    return None if k is None else k + (1 if args.class_dropout else 0)


def sample_labels(data: Any, n: int, seed: int) -> torch.Tensor | None:
    """Class ids for ``n`` samples of a conditional model, drawn with the training set's class frequencies (so
    the samples are comparable with unlabelled held-out data); None for unconditional data."""
    if not isinstance(data, LabelledData):
        return None
    return data.labels[torch.randint(len(data), (n,), generator=torch.Generator().manual_seed(seed))]


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def data_identity(args: argparse.Namespace) -> dict[str, Any]:
    """What the run trains on, kept in out/train_data.json so a resume on other data is caught, and so that
    samplers/sample.py and eval/evaluate.py find it (a token file: its alphabet, vocabulary and held-out share)."""
    if args.tokens is not None:
        return {"tokens": str(Path(args.tokens).expanduser().absolute()), "format": args.token_format,
                "alphabet": args.token_alphabet, "vocab_size": getattr(args, "vocab_size", None),
                "holdout": TOKEN_HOLDOUT}
    if args.table is not None:
        return {"table": str(Path(args.table).expanduser().absolute()), "split_seed": args.seed}  # the split's seed
    if args.image_folder is not None:
        return {"image_folder": str(Path(args.image_folder).expanduser().absolute()), "image_size": args.image_size,
                "image_channels": 3 if args.image_channels is None else args.image_channels}
    if getattr(args, "energy", None) is not None:
        samples = None if args.samples is None else str(Path(args.samples).expanduser().absolute())
        return {"energy": FAMILIES.get(args.family).energy_from_args(args), "samples": samples}
    if getattr(args, "target", None) is not None:  # a family's own target (a GFlowNet's environment)
        return dict(args.target)
    return {"data": args.data}


def check_resume(args: argparse.Namespace, model: torch.nn.Module, config: TrainConfig) -> int:
    """The step a resumed run starts from (0 when fresh). A run of another model in --out is an error; so are
    training flags or data that differ from that run's (unless --allow-new-settings)."""
    ckpt = Path(args.out) / "checkpoint"
    if not checkpoint.has_resume_state(ckpt):
        return 0
    saved = _flat(checkpoint.read_config(ckpt))
    mine = _flat(json.loads(json.dumps(checkpoint.model_config(model))))  # tuples -> lists, as saved
    differ = [f"{key}: {saved.get(key)!r} there, {value!r} now"
              for key, value in mine.items() if saved.get(key) != value]
    if differ:
        raise ConfigError(f"{ckpt} holds a different model ({'; '.join(differ[:4])}); re-run with that run's flags "
                          "to resume it, or pick a new --out to start afresh")
    state = checkpoint.read_trainer_state(ckpt)
    saved = state.get("train_config") or {}
    if args.warmup is None and isinstance(saved.get("warmup_steps"), int):
        config.warmup_steps = min(saved["warmup_steps"], config.steps)  # the default follows --steps: keep the run's
    changes = [f"{FLAGS.get(k, k)} {a!r} there, {b!r} now" for k, (a, b) in resume_changes(saved, config).items()]
    data_file = Path(args.out) / "train_data.json"
    if data_file.is_file():
        saved_data = json.loads(data_file.read_text(encoding="utf-8"))
        changes += [f"--{k.replace('_', '-')} {saved_data.get(k)!r} there, {v!r} now"
                    for k, v in data_identity(args).items() if saved_data.get(k) != v]
    if changes and not args.allow_new_settings:
        raise ConfigError(f"{args.out} holds a run with other settings ({'; '.join(changes)}); re-run with that "
                          "run's flags to resume it exactly, add --allow-new-settings to go on with the new ones, or "
                          "pick a new --out to start afresh")
    return int(state["step"])


# --------------------------------------------------------------------------------------------- evaluation
def held_out_sets(args: argparse.Namespace, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``genkit.data.held_out`` for a named set, the test split of a table or of an energy run's --samples FILE;
    image folders and energy runs without samples have none."""
    if getattr(args, "energy", None) is not None and args.samples is not None:
        dim = energy_from_config(FAMILIES.get(args.family).energy_from_args(args)).dim
        return samples_held_out(args.samples, dim, n, args.seed)
    if (args.image_folder is not None or getattr(args, "energy", None) is not None
            or getattr(args, "target", None) is not None):
        return None, None
    if args.table is not None:
        return table_held_out(args.table, n, args.seed)
    if args.tokens is not None:
        return tokens_held_out(args.tokens, n, args.seed, args.token_alphabet, TOKEN_HOLDOUT)
    return held_out(args.data, n, args.seed)


def quality(x: torch.Tensor, ref: torch.Tensor, features: Callable | None) -> dict[str, float]:
    if x.ndim == 2:
        g = torch.Generator().manual_seed(0)
        return {"sliced_w2": metrics.sliced_wasserstein(x, ref, generator=g),
                "energy_distance": metrics.energy_distance(x, ref)}
    return {"frechet_digits": metrics.fid(x.clamp(-1, 1), ref, features)}


def final_sampling(args: argparse.Namespace, model: torch.nn.Module) -> genkit.cli.ScriptSampler:
    """--solver / --sample-steps / --grid / --t-max as the model's sampler (its default sampler where they are not
    given) and what the outputs say about it, resolved as every script resolves them (genkit.cli.resolve_sampler)."""
    return genkit.cli.resolve_sampler(model, args.solver, args.sample_steps, args.grid, args.t_max,
                                      flags={"steps": "--sample-steps"})


def final_sampler(args: argparse.Namespace, model: torch.nn.Module) -> Sampler:
    """The final sampling's sampler (:func:`final_sampling`)."""
    return final_sampling(args, model).sampler


def check_final_sampling(args: argparse.Namespace, model: torch.nn.Module) -> genkit.cli.ScriptSampler:
    """The final sampling's settings, tried on the untrained model with one sample before training starts: a
    setting that cannot sample fails now, not after the training it would follow."""
    chosen = final_sampling(args, model)
    labels = 0 if getattr(model, "num_classes", None) is not None else None  # a conditional model: any class
    try:
        model.sample(1, sampler=chosen.sampler, labels=labels, generator=torch.Generator().manual_seed(0))
    except genkit.errors.GenkitError as e:
        raise ConfigError(f"the final sampling ({chosen.describe()}) cannot run on this model, so training was not "
                          f"started: {e}") from e
    return chosen


def sample_and_measure(args: argparse.Namespace, data: Any, device: torch.device, start: int, step: int,
                       train_time: float) -> dict[str, Any]:
    out = Path(args.out)
    model = genkit.load(out / "checkpoint", map_location=device)  # EMA weights when saved
    is_image = len(model.sample_shape) == 3
    n = args.n_samples or (256 if is_image else 2000)
    chosen = final_sampling(args, model)
    sampler = chosen.sampler
    t0 = time.perf_counter()
    sol = model.sample(n, sampler=sampler, return_solution=True, labels=sample_labels(data, n, args.seed),
                       generator=torch.Generator(device=device).manual_seed(args.seed))
    samples = sol.samples.cpu()  # token ids stay long (the picture shows their frequencies)
    x = samples.float() if samples.is_floating_point() else samples
    sample_time = time.perf_counter() - t0
    ref, floor = held_out_sets(args, n)
    record = chosen.record()
    record["sample_steps"] = record.pop("steps")
    energy = getattr(model, "energy", None)
    target = getattr(args, "target", None)
    report: dict[str, Any] = {
        "data": (args.image_folder or args.table or args.tokens or args.data
                 or (", ".join(f"{k} {v.get('name', v) if isinstance(v, dict) else v}" for k, v in target.items())
                     if target is not None else None)
                 or f"energy {getattr(args, 'energy', None)}"),
        "family": args.family, "step": step,
        "n_samples": n,
        **record, "sampled_with": chosen.describe(), "nfe": sol.nfe,
        "sample_time_s": sample_time, "train_time_s": train_time, "train_steps_this_run": step - start,
        "train_steps_per_s": (step - start) / train_time if step > start else None,
    }
    if energy is not None:  # trained by an energy: importance weights against it (and held-out samples of it)
        report["energy"] = energy_metrics(model, n, torch.Generator(device=device).manual_seed(args.seed + 1))
        if ref is not None:  # --samples FILE: its test split, never trained on
            report["samples"] = str(Path(args.samples).expanduser().absolute())
            report["nll"] = held_out_nll(model, ref.to(device), torch.Generator(device=device).manual_seed(args.seed))
            if report["nll"] is None:
                report["note_nll"] = getattr(model, "no_likelihood", "none: this model has no likelihood")
            report.update(quality(x, ref, None))
            report["noise_floor"] = quality(floor, ref, None)
    elif target is not None and callable(getattr(model, "target_report", None)):  # e.g. a GFlowNet's exact L1
        report.update(model.target_report(samples))
    elif ref is not None and callable(getattr(model, "sample_report", None)):  # the family's own report (tokens)
        report.update(model.sample_report(x, ref, floor, data=args.data,
                                          generator=torch.Generator(device=device).manual_seed(args.seed + 1)))
    elif target is not None:
        report["note"] = f"--family {args.family} has no report of its samples against its target"
    elif ref is None or (is_image and args.data != "digits"):
        report["note"] = ("no sample-quality metric for these images: a Frechet distance needs a feature network "
                          "for them (genkit.metrics.fid with inception_features); only digits have a built-in one")
    else:
        features = (metrics.train_digits_classifier(digits("train"), digits_labels("train"),
                                                    generator=torch.Generator().manual_seed(0)).features
                    if is_image else None)
        report.update(quality(x, ref, features))
        report["noise_floor"] = quality(floor, ref, features)
    if ref is None and data is not None:  # an image folder: show training images next to the samples
        images = data.data if isinstance(data, LabelledData) else data
        ref = torch.stack([images[i] for i in range(min(MAX_IMAGES, len(images)))])
    genkit.cli.save_picture(model, samples, out / "samples.png", reference=ref,
                 title=f"{args.family} on {report['data']}: {chosen.describe()} (NFE {sol.nfe}), step {step}")
    alphabet = getattr(args, "token_alphabet", None) or TOKEN_ALPHABETS.get(args.data)
    if alphabet is not None and not x.is_floating_point():  # token samples as sequences, as sample.py writes them
        save_tokens(out / ("samples.fasta" if getattr(args, "token_format", None) == "fasta" else "samples.txt"),
                    x, alphabet)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def sample_callback(args: argparse.Namespace, data: Any = None) -> Callable[[Trainer, LogRecord], None]:
    """Every --sample-every steps the main process draws a picture from the current EMA weights."""
    def callback(trainer: Trainer, record: LogRecord) -> None:
        if not record.is_main_process or record.step % args.sample_every:
            return
        live = trainer.model
        device = next(live.parameters()).device
        model = build(live.config()).to(device)
        model.load_state_dict(trainer.ema.state_dict() if trainer.ema is not None else live.state_dict())
        x = model.eval().sample(64, sampler=final_sampler(args, model), labels=sample_labels(data, 64, args.seed),
                                generator=torch.Generator(device=device).manual_seed(args.seed))
        genkit.cli.save_picture(model, x, Path(args.out) / "samples" / f"step_{record.step:07d}.png",
                                title=f"step {record.step}")
    return callback


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    resolve_model_flags(args)
    config = train_config(args)
    data, shape = load_data(args)
    threads = args.threads if args.threads is not None else (1 if len(shape) == 1 else None)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be a positive integer; got {threads}")
        torch.set_num_threads(threads)
    check_data_kind(args, data)  # token data for a token family only (its prepare_data hook), before the model
    torch.manual_seed(args.seed)  # the initial weights: the same on every rank and every re-run
    model = build_model(args, shape)  # every model flag is checked before the slow file check below
    check_energy_samples(args, model)  # an --energy run: --samples exactly when its objective trains on them
    chosen = check_final_sampling(args, model)  # and the final sampling's settings, before training
    if chosen.note and os.environ.get("RANK", "0") == "0":
        print(f"note: {chosen.note}")
    start = check_resume(args, model, config)
    first = os.environ.get("RANK", "0") == "0"  # before accelerate starts: the launcher's rank
    if args.image_folder is not None:
        if first:
            print(f"checking all {len(data)} images under {args.image_folder} ...", flush=True)
        data.verify()  # open every image now: a corrupt file fails here, not hours into training
    trainer = Trainer(model, config, callbacks=[sample_callback(args, data)] if args.sample_every else ())
    main_process = trainer.accelerator.is_main_process
    if args.no_progress:
        trainer.callbacks.append(genkit.cli.log_lines())  # no bar: a line per --log-every steps instead
    if main_process:
        logging.basicConfig(format="%(message)s", stream=sys.stdout)
        logging.getLogger("genkit").setLevel(logging.INFO)  # the trainer says which steps it runs
        if start:
            print(f"resuming {args.out}/checkpoint from step {start} (use a new --out to start afresh)")
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "train_data.json").write_text(json.dumps(data_identity(args)) + "\n", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--out {args.out}: cannot create the run directory ({e}); pick a writable --out"
                              ) from e
    t0 = time.perf_counter()
    result = trainer.fit(data, allow_new_settings=args.allow_new_settings)
    train_time = time.perf_counter() - t0
    if not main_process:
        return
    device = trainer.accelerator.device
    device = torch.device("cpu") if device.type == "cpu" else device  # accelerate's "cpu:0" under torchrun
    out = Path(args.out)
    try:
        report = sample_and_measure(args, data, device, start, result.step, train_time)
    except KeyboardInterrupt:  # the checkpoint was written (and fsynced) before the final sampling began
        raise genkit.errors.TrainingInterrupted(
            f"interrupted during the final sampling, after training; the checkpoint {out / 'checkpoint'} is complete "
            f"and safe (step {result.step}): sample it with samplers/sample.py --checkpoint {out}, or score it with "
            f"eval/evaluate.py --checkpoint {out}", result.step, out / "checkpoint", signal.SIGINT) from None
    floor = report.get("noise_floor", {})  # every distance the report has, the family's own ones included
    scores = ", ".join(f"{k} {report[k]:.4g} (floor {v:.4g})" for k, v in floor.items()
                       if isinstance(report.get(k), float))
    if isinstance(report.get("nll"), dict):
        bound = "=" if report["nll"]["method"].startswith("exact") else "<="  # an ELBO, a path bound: <=
        scores += f", held-out NLL {bound} {report['nll']['nats']:.4g} nats ({report['nll']['method']})"
    held = scores.lstrip(", ")

    if "log_z_learned" in report:  # a GFlowNet: its exact distribution against the target, or its rewards
        scores = genkit.cli.target_summary(report)
    if "energy" in report:
        e = report["energy"]
        scores = (f"ESS {e['ess']:.1f} of {e['n']}, log Z {e['log_z']:.4f} +- {e['log_z_stderr']:.4f}"
                  + ("" if e["log_z_reference"] is None else f" (reference {e['log_z_reference']:.4f})")
                  + (f"; held-out samples: {held}" if held else ""))
    print(f"trained to step {result.step} in {train_time:.1f} s; sampled {report['n_samples']} with "
          f"{report['sampled_with']} (NFE {report['nfe']}) in {report['sample_time_s']:.2f} s"
          + (f"; {scores}" if scores else ""))
    print(f"checkpoint: {out / 'checkpoint'}\nsamples:    {out / 'samples.png'}\nmetrics:    {out / 'metrics.json'}")


if __name__ == "__main__":
    sys.exit(run_main(main))
