"""Fine-tune a pretrained checkpoint toward a reward, and watch the reward against what the model learned while it
trains (user story 4): a masked diffusion checkpoint (train.py --family mdlm) with DRAKES or SEPO, or a continuous
one (a train.py --family diffusion or flow_matching run, or a diffusers pipeline folder through
genkit.from_diffusers) with VARD, DRaFT or DDPO.

Methods (--method), masked discrete diffusion:
  drakes  DRAKES (Wang et al. 2025): backpropagates a differentiable reward through a Gumbel-softmax rollout
          (the last --truncate steps), with the KL to the pretrained model weighted by --alpha
          (genkit.finetune.DRAKES).
  sepo    SEPO (Zekri & Boulle 2025): policy gradients through the concrete score, for any reward (it is only
          called on sampled tokens), GRPO advantages over --group rollouts, --inner passes, clipping --clip,
          optional KL to the pretrained model --kl-weight (genkit.finetune.SEPO).
Continuous diffusion and flow matching, sampled by a stochastic solver with Gaussian steps (--solver: ancestral,
the default for diffusion; euler_maruyama, the default for flow matching, on the model's SDE from t = 0.99):
  vard    VARD (Dai et al. 2025, arXiv 2505.15791): a value network V(x_t, t) of the expected final reward,
          regressed on the model's rollouts, backpropagated through single steps, with the per-step KL to the
          pretrained steps weighted by --eta (the temperature of the tilted target); the reward may be
          non-differentiable (only V is differentiated) (genkit.finetune.VARD).
  draft   DRaFT (Clark et al. 2024): backpropagates a differentiable reward through the last --truncate steps,
          optional KL --eta (genkit.finetune.DRaFT).
  ddpo    DDPO (Black et al. 2024): clipped (--clip) policy gradients over the Gaussian step log-probabilities,
          --reuse loss calls per rollout, --advantages batch or per_prompt (per class), optional KL --eta, for any
          reward (genkit.finetune.DDPO).
A class-conditional continuous model fine-tunes on the classes of --class (the rollouts' labels are drawn from
them; they reach the model, the pretrained model and VARD's value network).

The reward (--reward) is a registered name (genkit.finetune.oracles.REWARDS: dna_oracle, the DNA-like task's
fine-tuning oracle; dna_eval_oracle; dna_activity, its exact activity), or the user's own as module:attribute or
path/to/file.py:attribute (a genkit Reward, an nn.Module, or a function of a batch returning [batch]; a function
is non-differentiable unless it has `differentiable = True`; DRAKES needs a differentiable one, taking soft
one-hots [B, L, V]; so does DRaFT, on samples [B, *sample_shape]). Default: dna_oracle for a model trained on the
dna set.

Every --eval-every steps, and for the pretrained model before training, --eval-samples samples are drawn from
the same noise and scored. Masked diffusion (genkit.finetune.report.sequence_report): each reward's mean and
median (the fine-tuning reward, --eval-reward, an evaluation oracle trained on other data by default for dna, and
the exact activity for dna), the 3-mer correlation with held-out data, the log-likelihood bound under the
pretrained model (ELBO, nats per sequence), diversity and the task's motif statistics. Continuous: each reward's
mean and median, the KL to the pretrained model (kl: the per-step Gaussian KL of the fine-tuned to the pretrained
step, summed over the chain and averaged over the samples, a Monte-Carlo estimate of the KL of the two chains'
path laws) and the drift from held-out data of the pretrained run (--data, default its train_data.json; vectors:
sliced_w2, energy_distance, mmd; digits: frechet_digits in the digits classifier's features, as
eval/evaluate.py reports them). A reward that climbs while naturalness falls (or KL and drift rise) is
over-optimisation: stop there (every checkpoint is kept under --out/checkpoint at --checkpoint-every).

--out holds checkpoint/ (the fine-tuned model in the common format: genkit.load it, samplers/sample.py and
eval/evaluate.py take it; its trainer state records the pretrained model and reward by reference),
metrics.jsonl (the trainer's losses), finetune_log.jsonl (one line per evaluation), finetune_report.{json,md}
(pretrained vs fine-tuned) and a plot: reward_naturalness.png (masked diffusion) or reward_kl_drift.png
(continuous). An existing --out is resumed.

examples:
  python train/train.py --family mdlm --data dna --out runs/dna                       # pretrain
  python train/finetune.py --model runs/dna --method drakes --out runs/dna_drakes
  python train/finetune.py --model runs/dna --method sepo --reward my_reward.py:score --out runs/dna_sepo
  python samplers/sample.py --checkpoint runs/dna --solver svdd --reward dna_oracle    # steer, no fine-tuning
  python train/train.py --data moons --out runs/moons                                  # flow matching
  python train/finetune.py --model runs/moons --method vard --reward my_reward.py:right --out runs/moons_vard
  python train/finetune.py --model runs/digits --method ddpo --reward digit.py:p3 --class 3 --out runs/d_ddpo
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import genkit
from genkit.cli import (
    HelpFormatter,
    ScriptParser,
    check_method,
    checkpoint_dir,
    digits_features,
    is_diffusers_folder,
    log_lines,
    resolve_sampler,
    run_main,
    sample_distances,
    tokens_held_out,
    trained_data,
)
from genkit.data import DATASETS, held_out
from genkit.errors import ConfigError, ShapeError
from genkit.finetune import DDPO, DRAKES, SEPO, VARD, DRaFT, GaussianChain, ValueNetwork, step_kl
from genkit.finetune.checks import is_mdlm
from genkit.finetune.gaussian_steps import draw_cond, draw_prior
from genkit.finetune.oracles import get_reward
from genkit.finetune.report import sequence_report
from genkit.sampling import ODESampler
from genkit.train import TrainConfig, Trainer

#: the continuous methods' common flags (argparse dests)
CHAIN_FLAGS = ("solver", "class", "eta")
#: each method's own flags (argparse dests): another method's flag is refused
METHOD_FLAGS = {
    "drakes": ("truncate", "tau", "alpha", "alpha_warmup", "kl", "states"),
    "sepo": ("group", "inner", "clip", "snis", "kl_weight", "reduction"),
    "vard": (*CHAIN_FLAGS, "value_warmup", "value_updates", "policy_updates", "value_lr_scale", "value_hidden",
             "value_target", "value_replay", "replay_batches"),
    "draft": (*CHAIN_FLAGS, "truncate"),
    "ddpo": (*CHAIN_FLAGS, "clip", "reuse", "advantages"),
}
METHODS = tuple(METHOD_FLAGS)
DISCRETE, CONTINUOUS = ("drakes", "sepo"), ("vard", "draft", "ddpo")
#: the default evaluation reward of a data set's fine-tuning reward
EVAL_REWARD = {"dna_oracle": "dna_eval_oracle"}
#: the drift number a continuous run's plot shows, by what was scored
DRIFT = ("frechet_digits", "sliced_w2")


def class_ids(text: str) -> list[int]:
    """``--class 3`` or ``--class 0,1,2`` as a list of class ids."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--class must be comma-separated class ids like 3 or 0,1,2; got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(prog="finetune.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the pretrained checkpoint or train.py run (mdlm for drakes / sepo; diffusion or "
                        "flow_matching for vard / draft / ddpo), or a diffusers pipeline folder (vard / draft / ddpo)")
    p.add_argument("--method", required=True, metavar="NAME", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory; an existing one is resumed")
    p.add_argument("--reward", metavar="SPEC", help="registered name, module:attribute or file.py:attribute "
                                                    "(default: dna_oracle for a dna model)")
    p.add_argument("--eval-reward", metavar="SPEC", help="a second reward that only scores (default: "
                                                         "dna_eval_oracle with dna_oracle; 'none' for none)")
    p.add_argument("--data", metavar="NAME", help="held-out data of the naturalness / drift scores (default: the "
                                                  "pretrained run's, from its train_data.json; continuous "
                                                  "methods: 'none' scores no drift)")
    g = p.add_argument_group("drakes (--method drakes)")
    g.add_argument("--truncate", type=int, metavar="K", help="drakes, draft: differentiable last steps (drakes 50, "
                                                             "draft 1)")
    g.add_argument("--tau", type=float, help="Gumbel-softmax temperature (1.0)")
    g.add_argument("--alpha", type=float, help="KL weight (1e-3)")
    g.add_argument("--alpha-warmup", type=int, metavar="N", help="linear warm-up steps of alpha (0)")
    g.add_argument("--kl", metavar="FORM", help="paper (masked-position path KL) or code (the released code's) "
                                                "(paper)")
    g.add_argument("--states", metavar="HOW",
                   help="soft (the paper's and code's Gumbel-softmax states) or straight_through (one-hot states, "
                        "soft gradients: on the enumerable toy it reaches the tilted target p*, which soft states at "
                        "tau 1 miss, acting like ~2.5x alpha; see genkit.finetune.DRAKES) (soft)")
    g = p.add_argument_group("sepo (--method sepo)")
    g.add_argument("--group", type=int, metavar="G", help="rollouts per group for GRPO advantages (8)")
    g.add_argument("--inner", type=int, metavar="MU", help="training passes per rollout batch (5)")
    g.add_argument("--clip", type=float, metavar="EPS", help="importance-ratio clipping (sepo 0.2; ddpo 1e-4, "
                                                             "DDPO's)")
    g.add_argument("--snis", type=int, metavar="M", help="neighbours drawn per sample for SNIS (2)")
    g.add_argument("--kl-weight", type=float, metavar="W", help="KL to the pretrained model (0: off)")
    g.add_argument("--reduction", metavar="HOW", help="batch (the code's clipping after the batch sum) or "
                                                      "sample (textbook PPO) (batch)")
    g = p.add_argument_group("vard, draft, ddpo (continuous models)")
    g.add_argument("--solver", metavar="NAME", help="the stochastic solver with Gaussian steps: ancestral (default "
                                                    "for diffusion) or euler_maruyama (default for flow matching)")
    g.add_argument("--class", metavar="IDS",
                   help="a class-conditional model's classes to fine-tune on, e.g. 3 or 0,1,2 (needed for one)")
    g.add_argument("--eta", type=float, help="KL weight to the pretrained steps (vard 1.0, the tilted target's "
                                             "temperature; draft and ddpo 0: off)")
    g.add_argument("--value-warmup", type=int, metavar="N", help="vard: value-only steps before the first policy "
                                                                 "step (10)")
    g.add_argument("--value-updates", type=int, metavar="N", help="vard: value steps per round (1)")
    g.add_argument("--policy-updates", type=int, metavar="N", help="vard: policy steps per round (8)")
    g.add_argument("--value-lr-scale", type=float, metavar="S", help="vard: value learning rate / --lr (5.0)")
    g.add_argument("--value-hidden", type=int, metavar="H", help="vard: width of the value network: its MLP's "
                                                                 "hidden size for vectors (128), its UNet's first "
                                                                 "channels for images (32)")
    g.add_argument("--value-target", metavar="WHAT", help="vard: what the value regresses on: soft (the "
                                                          "KL-regularised return to go) or reward (the final reward, "
                                                          "as in the paper) (soft)")
    g.add_argument("--value-replay", type=int, metavar="N", help="vard: value steps per round on the stored "
                                                                 "rollouts of earlier value steps, no reward queries "
                                                                 "(4)")
    g.add_argument("--replay-batches", type=int, metavar="N", help="vard: value batches the replay keeps (4)")
    g.add_argument("--reuse", type=int, metavar="N", help="ddpo: loss calls per rollout (1)")
    g.add_argument("--advantages", metavar="HOW", help="ddpo: batch or per_prompt (per class) (batch)")
    g = p.add_argument_group("training")
    g.add_argument("--train-steps", type=int, default=200, metavar="N", help="optimizer steps (a resumed run "
                                                                             "continues to it)")
    g.add_argument("--batch-size", type=int, metavar="N", help="drakes: rollouts per step (32); sepo: groups of "
                                                              "--group rollouts per rollout batch (16); vard, draft, "
                                                              "ddpo: trajectories per step (64)")
    g.add_argument("--sample-steps", type=int, default=64, metavar="N",
                   help="reverse steps of the rollouts and evaluation samples (the papers use 128)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW, cosine decay; both papers' 1e-4)")
    g.add_argument("--warmup", type=int, default=0, metavar="N", help="linear warm-up steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (both papers' 1.0)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="A",
                   help="micro-batches per optimizer step (DRAKES' DNA runs: 4); the gradient is their mean's")
    g.add_argument("--seed", type=int, default=0, help="seeds rollouts and evaluation")
    g.add_argument("--checkpoint-every", type=int, default=100, metavar="N", help="steps between checkpoints")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--threads", type=int, default=1, metavar="N", help="CPU threads for torch")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, metavar="N", help="steps between evaluations (default: "
                                                               "train-steps / 5)")
    g.add_argument("--eval-samples", type=int, default=256, metavar="N", help="samples per evaluation")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    check_method(args, METHOD_FLAGS)
    for flag in ("train_steps", "sample_steps", "eval_samples", "threads", "checkpoint_every", "batch_size",
                 "eval_every", "grad_accum", "value_hidden"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer; got {value}")
    if args.eval_samples < 2:
        raise ConfigError(f"--eval-samples must be at least 2 (diversity compares pairs); got {args.eval_samples}")
    if args.data is not None and args.data not in DATASETS.names() and not (args.data == "none"
                                                                             and args.method in CONTINUOUS):
        extra = " (or none: no drift scores)" if args.method in CONTINUOUS else ""
        raise ConfigError(f"unknown --data {args.data!r}; choose one of {', '.join(DATASETS.names())}{extra}")


def load_pretrained(path: str, method: str) -> tuple[Any, Path]:
    """The pretrained model (EMA weights) and its checkpoint folder: masked diffusion for a discrete method, a
    continuous diffusion / flow-matching field (or a diffusers pipeline folder) for a continuous one."""
    if method in CONTINUOUS and is_diffusers_folder(path):
        return genkit.from_diffusers(path), Path(path)
    ckpt = checkpoint_dir(path)
    if not ckpt.is_dir():
        raise ConfigError(f"--model {path}: no such folder; pass a train.py run or its checkpoint (mdlm for "
                          f"{' / '.join(DISCRETE)}; diffusion or flow_matching, or a diffusers pipeline folder, for "
                          f"{' / '.join(CONTINUOUS)})")
    model = genkit.load(ckpt)
    family = getattr(model, "family", type(model).__name__)
    continuous = isinstance(model, torch.nn.Module) and hasattr(model, "sample_shape") and hasattr(model, "path") \
        and callable(getattr(model, "default_sampler", None)) and isinstance(model.default_sampler(), ODESampler)
    if method in DISCRETE and not is_mdlm(model):
        hint = f"; for this continuous model use --method {', '.join(CONTINUOUS[:-1])} or {CONTINUOUS[-1]}" \
            if continuous else ""
        raise ConfigError(f"--model {path} holds a {family!r} model; --method {method} fine-tunes masked discrete "
                          f"diffusion (train.py --family mdlm){hint}")
    if method in CONTINUOUS and not continuous:
        hint = f"; for masked diffusion use --method {' or '.join(DISCRETE)}" if is_mdlm(model) else ""
        raise ConfigError(f"--model {path} holds a {family!r} model; --method {method} fine-tunes a continuous "
                          f"diffusion or flow-matching model (train.py --family diffusion or flow_matching, or a "
                          f"diffusers pipeline folder){hint}")
    return model, ckpt


def naturalness_data(args: argparse.Namespace, ckpt: Path, n: int) -> tuple[torch.Tensor, str | None]:
    """Held-out token data (``[n', L]``) for the k-mer correlation, and the data set's name (None for a file)."""
    record = trained_data(ckpt) or {}
    name = args.data or record.get("data")
    if name is not None:
        return held_out(name, n, args.seed)[0], name
    if "tokens" in record:
        ref, _ = tokens_held_out(record["tokens"], n, args.seed, record.get("alphabet"), record.get("holdout"))
        return ref, None
    raise ConfigError(f"nothing records what {ckpt} trained on ({ckpt.parent / 'train_data.json'} is missing); pass "
                      "--data NAME, the data set the pretrained model learned, for the naturalness scores")


def drift_data(args: argparse.Namespace, ckpt: Path, model: Any, n: int) -> tuple[torch.Tensor | None, str | None]:
    """Held-out samples of the pretrained run's data (``[n', *sample_shape]``) the drift is measured against, and
    the data set's name; ``(None, None)`` for ``--data none``."""
    if args.data == "none":
        return None, None
    name = args.data or (None if is_diffusers_folder(ckpt) else (trained_data(ckpt) or {}).get("data"))
    if name is None:
        raise ConfigError(f"nothing records what {ckpt} trained on (no train_data.json beside it); pass --data NAME, "
                          "the data set the pretrained model learned, for the drift scores, or --data none")
    ref = held_out(name, n, args.seed)[0]
    shape = tuple(model.sample_shape)
    if tuple(ref.shape[1:]) != shape:
        raise ShapeError(f"--data {name} has samples of shape {tuple(ref.shape[1:])} but the model makes {shape}; "
                         "pass the data set it learned, or --data none")
    if len(shape) == 3 and name != "digits":
        raise ConfigError(f"--data {name}: only digits images have a built-in feature network for the Frechet "
                          "drift; pass --data none")
    return ref, name


def chain_settings(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """``solver``, ``steps`` and ``grid`` of the Gaussian chain: --solver (default ancestral for diffusion,
    euler_maruyama for flow matching) and --sample-steps on the model's range, as samplers/sample.py resolves them
    (an SDE singular at t = 1 starts at t = 0.99)."""
    family = getattr(model, "family", None)
    name = args.solver or ("euler_maruyama" if family == "flow_matching" else "ancestral")
    solver = genkit.get_solver(name)
    if not (solver.gaussian_transitions and solver.stepwise):
        kind = "stochastic, but its step is not one Gaussian draw" if solver.stochastic else "deterministic"
        raise ConfigError(f"--solver {name} is {kind}; --method {args.method} needs each step's Gaussian density "
                          "(log-probabilities, the closed-form KL): use --solver ancestral (diffusion) or "
                          "euler_maruyama (flow matching or diffusion, the model's SDE)")
    picked = resolve_sampler(model, name, args.sample_steps, flags={"steps": "--sample-steps", "solver": "--solver"})
    if picked.note:
        print(picked.note, flush=True)
    return {"solver": picked.sampler._solver, "steps": picked.sampler.steps, "grid": picked.sampler.grid}


def value_network(model: Any, width: int | None) -> ValueNetwork:
    """VARD's value ``V(x, t)``: an MLP for vectors, a UNet for images (class-conditional like the model), in the
    model's dtype."""
    from genkit.nets import MLP, UNet

    shape = tuple(model.sample_shape)
    k = getattr(model, "num_classes", None)
    classes = None if k is None else k + (1 if getattr(model, "null_label", None) is not None else 0)
    if len(shape) == 1:
        value = ValueNetwork(MLP(shape[0], hidden=width or 128, depth=2, num_classes=classes))
    elif len(shape) == 3:
        c = width or 32
        if c % 8:
            raise ConfigError(f"--value-hidden {c} sets the value UNet's first channels, which must be a multiple of "
                              "8 (its GroupNorm groups); use 16 or 32")
        value = ValueNetwork(UNet(shape[-1], in_channels=shape[0], block_out_channels=(c, 2 * c),
                                  num_classes=classes), features=math.prod(shape))
    else:
        raise ConfigError(f"the model makes samples of shape {shape}, neither vectors nor images [C, H, W]; VARD's "
                          "value network is built for those (use the genkit.finetune.VARD API with your own)")
    return value.to(next(model.parameters()).dtype)


def check_classes(args: argparse.Namespace, model: Any) -> list[int] | None:
    """The class ids of --class (None without it), checked against the model's classes."""
    given = getattr(args, "class")
    labels = None if given is None else class_ids(given)
    k = getattr(model, "num_classes", None)
    if k is None and labels is not None:
        raise ConfigError(f"--class {given}: the model is unconditional; drop --class")
    if k is not None and labels is None:
        raise ConfigError(f"the model is class-conditional ({k} classes); pass --class IDS, the classes to fine-tune "
                          f"on (e.g. --class 0 or --class 0,...,{k - 1})")
    if labels is not None and any(not 0 <= c < k for c in labels):
        raise ConfigError(f"--class {given}: the model's classes are 0..{k - 1}")
    if args.advantages == "per_prompt" and labels is None:
        raise ConfigError("--advantages per_prompt normalises the rewards within each class; the model is "
                          "unconditional: use --advantages batch")
    return labels


def build_objective(args: argparse.Namespace, pretrained: Any, reward: Any) -> torch.nn.Module:
    model = copy.deepcopy(pretrained).requires_grad_(True).train()
    given = {dest: getattr(args, dest) for dest in METHOD_FLAGS[args.method] if getattr(args, dest) is not None}
    common = {"steps": args.sample_steps}
    if args.batch_size is not None:
        common["batch_size"] = args.batch_size
    if args.method in ("drakes", "draft") and not reward.differentiable:
        other = "sepo" if args.method == "drakes" else "vard or ddpo"
        takes = "soft one-hots [B, L, V]" if args.method == "drakes" else "samples [B, *sample_shape]"
        raise ConfigError(f"--method {args.method} backpropagates through the reward, and {reward.name!r} is not "
                          f"differentiable; use --method {other}, or give a differentiable reward (a function with "
                          f"`differentiable = True` taking {takes}, or an nn.Module)")
    if args.method == "drakes":
        if "truncate" not in given:
            given["truncate"] = min(50, args.sample_steps)
        return DRAKES(model, pretrained, reward, **common, **given)
    if args.method == "sepo":
        if "kl_weight" in given:
            given["kl"] = given.pop("kl_weight")
        return SEPO(model, reward, reference=pretrained, **common, **given)
    common.update(chain_settings(args, pretrained))
    for dest in ("solver", "value_hidden", "class"):
        given.pop(dest, None)
    labels = check_classes(args, pretrained)
    if labels is not None:
        given["labels"] = labels
    if args.method == "vard":
        return VARD(model, pretrained, reward, value_network(pretrained, args.value_hidden), **common, **given)
    return (DRaFT if args.method == "draft" else DDPO)(model, pretrained, reward, **common, **given)


class SequenceScores:
    """A masked diffusion model's samples scored by :func:`genkit.finetune.report.sequence_report`."""

    shown = ("kmer3_corr", "log_likelihood")

    def __init__(self, args: argparse.Namespace, pretrained: Any, rewards: dict[str, Any], data: torch.Tensor,
                 task: str | None):
        self.args, self.pretrained, self.rewards, self.data, self.task = args, pretrained, rewards, data, task

    def __call__(self, model: Any, generator: torch.Generator) -> dict[str, Any]:
        x = model.sample(self.args.eval_samples, steps=self.args.sample_steps, generator=generator)
        return sequence_report(x.cpu(), self.data, rewards=self.rewards, pretrained=self.pretrained, task=self.task,
                               generator=torch.Generator(generator.device).manual_seed(self.args.seed))


class ChainScores:
    """A continuous model's samples through the objective's Gaussian chain: each reward's mean and median, ``kl``
    (the per-step KL of the model's steps to the pretrained ones on its own trajectories, summed over the chain,
    averaged over the samples) and the drift from held-out data (:func:`genkit.cli.sample_distances`)."""

    shown = ("kl", *DRIFT)

    def __init__(self, args: argparse.Namespace, chain: GaussianChain, labels: torch.Tensor | None, pretrained: Any,
                 rewards: dict[str, Any], data: torch.Tensor | None):
        self.args, self.chain, self.labels, self.pretrained, self.rewards = args, chain, labels, pretrained, rewards
        self.data = data
        self.features = digits_features() if data is not None and data.ndim == 4 else None

    def __call__(self, model: Any, generator: torch.Generator) -> dict[str, Any]:
        field, times, end_x0 = self.chain.plan(model)
        ref_field = self.chain.field(self.pretrained)
        x = draw_prior(model, self.args.eval_samples, generator)
        cond = draw_cond(self.labels, len(x), generator, x.device)
        roll = self.chain.rollout(field, x, times, end_x0, cond, generator=generator)
        kl = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for n in roll.noisy:
            tr = roll.states[n + 1].transition
            ref = self.chain.transition(ref_field, roll.states[n], cond)
            kl += step_kl(tr.mean, ref.mean, tr.std).double()
        out: dict[str, Any] = {}
        for name, reward in self.rewards.items():
            r = reward(roll.samples).double().cpu()
            out[f"{name}_mean"], out[f"{name}_median"] = float(r.mean()), float(r.median())
        out["kl"] = float(kl.mean())
        if self.data is not None:
            out.update(sample_distances(roll.samples.float().cpu(), self.data, self.features, self.args.seed))
        return out


class Evaluator:
    """Scores the model's samples (from the same noise each time) and appends a line to finetune_log.jsonl."""

    def __init__(self, args: argparse.Namespace, measure: Callable[[Any, torch.Generator], dict[str, Any]],
                 out: Path):
        self.args, self.measure = args, measure
        self.log = out / "finetune_log.jsonl"

    def score(self, model: Any, step: int) -> dict[str, Any]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            report = self.measure(model, torch.Generator(device).manual_seed(self.args.seed + 7))
        model.train(was_training)
        line = {"step": step, **report}
        with self.log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return line

    def callback(self) -> Any:
        def on_log(trainer: Any, record: Any) -> None:
            if record.is_main_process and record.step % self.args.eval_every == 0:
                line = self.score(trainer.model, record.step)
                shown = {k: v for k, v in line.items() if k.endswith("_median") or k in self.measure.shown}
                print(f"eval step {record.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()),
                      flush=True)
        return on_log


def markdown(args: argparse.Namespace, before: dict[str, Any], after: dict[str, Any], note: str = "") -> str:
    keys = [k for k in after if k != "step"]
    lines = [f"# finetune.py --method {args.method}: pretrained vs fine-tuned ({after['step']} steps)", "",
             f"{args.eval_samples} samples each, {args.sample_steps} reverse steps, the same noise.{note}", "",
             "| metric | pretrained | fine-tuned |", "|---|---|---|"]
    lines += [f"| {k} | {before.get(k, float('nan')):.4g} | {after[k]:.4g} |" for k in keys]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(log: list[dict[str, Any]], reward: str, path: Path) -> None:
    plt = _pyplot()
    steps = [line["step"] for line in log]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in [k for k in log[0] if k.endswith("_median")]:
        axes[0].plot(steps, [line[key] for line in log], marker="o", label=key)
    axes[0].set(xlabel="step", ylabel="median reward", title="reward")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [line["kmer3_corr"] for line in log], marker="o", color="k", label="3-mer corr")
    axes[1].set(xlabel="step", ylabel="3-mer correlation", title="naturalness")
    if "log_likelihood" in log[0]:
        twin = axes[1].twinx()
        twin.plot(steps, [line["log_likelihood"] for line in log], marker="s", color="tab:red")
        twin.set_ylabel("log-likelihood bound (nats)", color="tab:red")
    fig.suptitle(f"fine-tuning toward {reward}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_chain(log: list[dict[str, Any]], reward: str, path: Path) -> None:
    """Reward, KL to the pretrained model and drift over the steps, and the reward against the KL."""
    plt = _pyplot()
    steps = [line["step"] for line in log]
    drift = next((k for k in DRIFT if k in log[0]), None)
    fig, axes = plt.subplots(1, 4 if drift else 3, figsize=(15 if drift else 11.5, 3.5))
    for key in [k for k in log[0] if k.endswith("_median")]:
        axes[0].plot(steps, [line[key] for line in log], marker="o", label=key)
    axes[0].set(xlabel="step", ylabel="median reward", title="reward")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [line["kl"] for line in log], marker="o", color="k")
    axes[1].set(xlabel="step", ylabel="KL (nats, path laws)", title="KL to the pretrained model")
    if drift:
        axes[2].plot(steps, [line[drift] for line in log], marker="o", color="tab:red")
        axes[2].set(xlabel="step", ylabel=drift, title="drift from held-out data")
    key = f"{reward}_mean"
    axes[-1].plot([line["kl"] for line in log], [line[key] for line in log], marker="o")
    for line in log:
        axes[-1].annotate(str(line["step"]), (line["kl"], line[key]), fontsize=7)
    axes[-1].set(xlabel="KL to the pretrained model", ylabel=key, title="reward vs KL (labels: steps)")
    fig.suptitle(f"fine-tuning toward {reward}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pretrained, ckpt = load_pretrained(args.model, args.method)
    continuous = args.method in CONTINUOUS
    record = {} if continuous and is_diffusers_folder(ckpt) else trained_data(ckpt) or {}
    spec = args.reward or ("dna_oracle" if (args.data or record.get("data")) == "dna" else None)
    if spec is None:
        raise ConfigError("--reward is needed: a registered name, module:attribute or path/to/file.py:attribute")
    reward = get_reward(spec)
    rewards = {reward.name: reward}
    eval_spec = args.eval_reward if args.eval_reward is not None else EVAL_REWARD.get(spec)
    if eval_spec not in (None, "none"):
        extra = get_reward(eval_spec)
        rewards[extra.name] = extra
    if continuous:
        data, task = drift_data(args, ckpt, pretrained, args.eval_samples)
    else:
        data, task = naturalness_data(args, ckpt, args.eval_samples)
        if task == "dna" and "dna_activity" not in rewards:
            rewards["dna_activity"] = get_reward("dna_activity")
    if args.eval_every is None:
        args.eval_every = max(1, args.train_steps // 5)
    objective = build_objective(args, pretrained, reward)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(steps=args.train_steps, batch_size=objective.batch_size, lr=args.lr,
                         warmup_steps=min(args.warmup, args.train_steps), ema_decay=None, grad_clip=args.grad_clip,
                         gradient_accumulation_steps=args.grad_accum,
                         seed=args.seed, checkpoint_every=args.checkpoint_every, out_dir=out,
                         log_every=args.eval_every, progress=not args.no_progress)
    if continuous:
        measure: Any = ChainScores(args, objective.chain, objective.labels, pretrained, rewards, data)
    else:
        measure = SequenceScores(args, pretrained, rewards, data, task)
    evaluator = Evaluator(args, measure, out)
    callbacks = [evaluator.callback()] + ([log_lines()] if args.no_progress else [])
    trainer = Trainer(objective, config, callbacks=callbacks)
    logging.basicConfig(format="%(message)s", stream=sys.stdout)
    logging.getLogger("genkit").setLevel(logging.INFO)
    if record:
        (out / "train_data.json").write_text(json.dumps(record) + "\n", encoding="utf-8")  # evaluate.py's default
    if not evaluator.log.exists():
        evaluator.score(pretrained, 0)  # the starting point, from the same noise
    result = trainer.fit()
    if not trainer.accelerator.is_main_process:
        return
    log = [json.loads(line) for line in evaluator.log.read_text(encoding="utf-8").splitlines() if line.strip()]
    if log[-1]["step"] != result.step:
        log.append(evaluator.score(trainer.model, result.step))
    before, after = log[0], log[-1]
    payload = {"args": vars(args), "rewards": list(rewards), "pretrained": before, "finetuned": after, "log": log}
    if continuous:
        payload.update(chain=objective.chain.config(), data=task,
                       reward_queries=int(getattr(objective, "reward_queries", 0)))
    (out / "finetune_report.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    note = ""
    if continuous:
        note = (f" Solver {objective.chain.solver!r}; kl: the per-step Gaussian KL to the pretrained steps, summed "
                "over the chain, averaged over the samples (nats); drift: "
                + (f"against held-out {task}." if task else "none scored (--data none)."))
    text = markdown(args, before, after, note)
    (out / "finetune_report.md").write_text(text, encoding="utf-8")
    figure = out / ("reward_kl_drift.png" if continuous else "reward_naturalness.png")
    (plot_chain if continuous else plot)(log, reward.name, figure)
    print(f"\nfine-tuned to step {result.step}; checkpoint: {out / 'checkpoint'}\n\n{text}"
          f"report: {out / 'finetune_report.md'} (and .json), log: {evaluator.log}, plot: {figure}")


if __name__ == "__main__":
    sys.exit(run_main(main))
