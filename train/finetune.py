"""Fine-tune a pretrained masked diffusion checkpoint (train.py --family mdlm) toward a reward, and watch reward
against naturalness while it trains (user story 4).

Methods (--method):
  drakes  DRAKES (Wang et al. 2025): backpropagates a differentiable reward through a Gumbel-softmax rollout
          (the last --truncate steps), with the KL to the pretrained model weighted by --alpha
          (genkit.finetune.DRAKES).
  sepo    SEPO (Zekri & Boulle 2025): policy gradients through the concrete score, for any reward (it is only
          called on sampled tokens), GRPO advantages over --group rollouts, --inner passes, clipping --clip,
          optional KL to the pretrained model --kl-weight (genkit.finetune.SEPO).

The reward (--reward) is a registered name (genkit.finetune.oracles.REWARDS: dna_oracle, the DNA-like task's
fine-tuning oracle; dna_eval_oracle; dna_activity, its exact activity), or the user's own as module:attribute or
path/to/file.py:attribute (a genkit Reward, an nn.Module, or a function of a batch returning [batch]; a function
is non-differentiable unless it has `differentiable = True`; DRAKES needs a differentiable one, taking soft
one-hots [B, L, V]). Default: dna_oracle for a model trained on the dna set.

Every --eval-every steps, and for the pretrained model before training, --eval-samples sequences are drawn from
the same noise and scored (genkit.finetune.report.sequence_report): each reward's mean and median (the
fine-tuning reward, --eval-reward, an evaluation oracle trained on other data by default for dna, and the exact
activity for dna), the 3-mer correlation with held-out data, the log-likelihood bound under the pretrained model
(ELBO, nats per sequence), diversity and the task's motif statistics. A reward that climbs while naturalness
falls is over-optimisation: stop there (every checkpoint is kept under --out/checkpoint at --checkpoint-every).

--out holds checkpoint/ (the fine-tuned model in the common format: genkit.load it, samplers/sample.py and
eval/evaluate.py take it; its trainer state records the pretrained model and reward by reference),
metrics.jsonl (the trainer's losses), finetune_log.jsonl (one line per evaluation), finetune_report.{json,md}
(pretrained vs fine-tuned) and reward_naturalness.png. An existing --out is resumed.

examples:
  python train/train.py --family mdlm --data dna --out runs/dna                       # pretrain
  python train/finetune.py --model runs/dna --method drakes --out runs/dna_drakes
  python train/finetune.py --model runs/dna --method sepo --reward my_reward.py:score --out runs/dna_sepo
  python samplers/sample.py --checkpoint runs/dna --solver svdd --reward dna_oracle    # steer, no fine-tuning
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import genkit
from genkit.cli import (
    HelpFormatter,
    ScriptParser,
    check_method,
    checkpoint_dir,
    log_lines,
    run_main,
    tokens_held_out,
    trained_data,
)
from genkit.data import DATASETS, held_out
from genkit.errors import ConfigError
from genkit.finetune import DRAKES, SEPO
from genkit.finetune.checks import is_mdlm
from genkit.finetune.oracles import get_reward
from genkit.finetune.report import sequence_report
from genkit.train import TrainConfig, Trainer

#: each method's own flags (argparse dests): another method's flag is refused
METHOD_FLAGS = {
    "drakes": ("truncate", "tau", "alpha", "alpha_warmup", "kl", "states"),
    "sepo": ("group", "inner", "clip", "snis", "kl_weight", "reduction"),
}
METHODS = tuple(METHOD_FLAGS)
#: the default evaluation reward of a data set's fine-tuning reward
EVAL_REWARD = {"dna_oracle": "dna_eval_oracle"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(prog="finetune.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="the pretrained mdlm checkpoint or train.py run")
    p.add_argument("--method", required=True, metavar="NAME", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory; an existing one is resumed")
    p.add_argument("--reward", metavar="SPEC", help="registered name, module:attribute or file.py:attribute "
                                                    "(default: dna_oracle for a dna model)")
    p.add_argument("--eval-reward", metavar="SPEC", help="a second reward that only scores (default: "
                                                         "dna_eval_oracle with dna_oracle; 'none' for none)")
    p.add_argument("--data", metavar="NAME", help="held-out data of the naturalness scores (default: the "
                                                  "pretrained run's, from its train_data.json)")
    g = p.add_argument_group("drakes (--method drakes)")
    g.add_argument("--truncate", type=int, metavar="K", help="differentiable last steps (50)")
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
    g.add_argument("--clip", type=float, metavar="EPS", help="importance-ratio clipping (0.2)")
    g.add_argument("--snis", type=int, metavar="M", help="neighbours drawn per sample for SNIS (2)")
    g.add_argument("--kl-weight", type=float, metavar="W", help="KL to the pretrained model (0: off)")
    g.add_argument("--reduction", metavar="HOW", help="batch (the code's clipping after the batch sum) or "
                                                      "sample (textbook PPO) (batch)")
    g = p.add_argument_group("training")
    g.add_argument("--train-steps", type=int, default=200, metavar="N", help="optimizer steps (a resumed run "
                                                                             "continues to it)")
    g.add_argument("--batch-size", type=int, metavar="N", help="drakes: rollouts per step (32); sepo: groups of "
                                                              "--group rollouts per rollout batch (16)")
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
                 "eval_every", "grad_accum"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer; got {value}")
    if args.eval_samples < 2:
        raise ConfigError(f"--eval-samples must be at least 2 (diversity compares pairs); got {args.eval_samples}")
    if args.data is not None and args.data not in DATASETS.names():
        raise ConfigError(f"unknown --data {args.data!r}; choose one of {', '.join(DATASETS.names())}")


def load_pretrained(path: str) -> tuple[Any, Path]:
    """The pretrained masked diffusion model (EMA weights) and its checkpoint folder."""
    ckpt = checkpoint_dir(path)
    if not ckpt.is_dir():
        raise ConfigError(f"--model {path}: no such folder; pass a train.py --family mdlm run or its checkpoint")
    model = genkit.load(ckpt)
    if not is_mdlm(model):
        raise ConfigError(f"--model {path} holds a {getattr(model, 'family', type(model).__name__)!r} model; "
                          "finetune.py fine-tunes masked discrete diffusion (train.py --family mdlm)")
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


def build_objective(args: argparse.Namespace, pretrained: Any, reward: Any) -> torch.nn.Module:
    model = copy.deepcopy(pretrained).requires_grad_(True).train()
    given = {dest: getattr(args, dest) for dest in METHOD_FLAGS[args.method] if getattr(args, dest) is not None}
    common = {"steps": args.sample_steps}
    if args.batch_size is not None:
        common["batch_size"] = args.batch_size
    if args.method == "drakes":
        if not reward.differentiable:
            raise ConfigError(f"--method drakes backpropagates through the reward, and {reward.name!r} is not "
                              "differentiable; use --method sepo, or give a differentiable reward (a function with "
                              "`differentiable = True` taking soft one-hots [B, L, V], or an nn.Module)")
        if "truncate" not in given:
            given["truncate"] = min(50, args.sample_steps)
        return DRAKES(model, pretrained, reward, **common, **given)
    if "kl_weight" in given:
        given["kl"] = given.pop("kl_weight")
    return SEPO(model, reward, reference=pretrained, **common, **given)


class Evaluator:
    """Scores the model's samples (from the same noise each time) and appends a line to finetune_log.jsonl."""

    def __init__(self, args: argparse.Namespace, pretrained: Any, rewards: dict[str, Any], data: torch.Tensor,
                 task: str | None, out: Path):
        self.args, self.pretrained, self.rewards, self.data, self.task = args, pretrained, rewards, data, task
        self.log = out / "finetune_log.jsonl"

    def score(self, model: Any, step: int) -> dict[str, Any]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            gen = torch.Generator(device).manual_seed(self.args.seed + 7)
            x = model.sample(self.args.eval_samples, steps=self.args.sample_steps, generator=gen)
            report = sequence_report(x.cpu(), self.data, rewards=self.rewards, pretrained=self.pretrained,
                                     task=self.task, generator=torch.Generator(device).manual_seed(self.args.seed))
        model.train(was_training)
        line = {"step": step, **report}
        with self.log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return line

    def callback(self) -> Any:
        def on_log(trainer: Any, record: Any) -> None:
            if record.is_main_process and record.step % self.args.eval_every == 0:
                line = self.score(trainer.model, record.step)
                shown = {k: v for k, v in line.items() if k.endswith("_median") or k in ("kmer3_corr",
                                                                                          "log_likelihood")}
                print(f"eval step {record.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()),
                      flush=True)
        return on_log


def markdown(args: argparse.Namespace, before: dict[str, Any], after: dict[str, Any]) -> str:
    keys = [k for k in after if k != "step"]
    lines = [f"# finetune.py --method {args.method}: pretrained vs fine-tuned ({after['step']} steps)", "",
             f"{args.eval_samples} samples each, {args.sample_steps} reverse steps, the same noise.", "",
             "| metric | pretrained | fine-tuned |", "|---|---|---|"]
    lines += [f"| {k} | {before.get(k, float('nan')):.4g} | {after[k]:.4g} |" for k in keys]
    return "\n".join(lines) + "\n"


def plot(log: list[dict[str, Any]], reward: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pretrained, ckpt = load_pretrained(args.model)
    record = trained_data(ckpt) or {}
    spec = args.reward or ("dna_oracle" if (args.data or record.get("data")) == "dna" else None)
    if spec is None:
        raise ConfigError("--reward is needed: a registered name, module:attribute or path/to/file.py:attribute")
    reward = get_reward(spec)
    data, task = naturalness_data(args, ckpt, args.eval_samples)
    rewards = {reward.name: reward}
    eval_spec = args.eval_reward if args.eval_reward is not None else EVAL_REWARD.get(spec)
    if eval_spec not in (None, "none"):
        extra = get_reward(eval_spec)
        rewards[extra.name] = extra
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
    evaluator = Evaluator(args, pretrained, rewards, data, task, out)
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
    (out / "finetune_report.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    text = markdown(args, before, after)
    (out / "finetune_report.md").write_text(text, encoding="utf-8")
    plot(log, reward.name, out / "reward_naturalness.png")
    print(f"\nfine-tuned to step {result.step}; checkpoint: {out / 'checkpoint'}\n\n{text}"
          f"report: {out / 'finetune_report.md'} (and .json), log: {evaluator.log}, plot: "
          f"{out / 'reward_naturalness.png'}")


if __name__ == "__main__":
    sys.exit(run_main(main))
