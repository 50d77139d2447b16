"""Reward fine-tuning of a continuous digits diffusion model (issue 13's benchmark): VARD against DRaFT and DDPO
at equal reward queries, reward against KL to the pretrained model and against Frechet drift, in one run.

The pretrained model: a ``Diffusion`` (cosine path, v-prediction) on the flattened 8x8 digits of the *train*
split with an MLP (``--hidden`` x ``--depth``), ``--pretrain-steps`` steps through genkit's ``Trainer`` (EMA
weights); an MLP rather than the digits UNet because a UNet step costs ~25x an MLP step on one CPU thread
(``--net unet`` builds ``genkit.nets.UNet(block_out_channels=32,64)`` for a GPU run). Every method samples it with
the ``ancestral`` solver (DDPM steps) on ``--steps`` uniform steps ending in the final denoising step.

Rewards (frozen parts of the objectives):

- ``classifier``: ``p(y = --digit | x)`` from a ``genkit.metrics.DigitsClassifier`` trained on the digits *test*
  split (held out from the generator's training split; its accuracy on the train split is reported), on the
  clamped sample; declared differentiable.
- ``mass``: ``1[mean ink > tau]``, ink ``(x + 1) / 2`` averaged over the 64 pixels, ``tau`` the
  ``--mass-quantile`` quantile of the train split's ink; non-differentiable. DRaFT refuses it (a genkit
  ConfigError, recorded in the JSON): DRaFT runs on the classifier reward only.

Methods, through genkit's ``Trainer`` (Adam, constant ``--lr``, grad clip 1, no EMA) until ``--queries`` reward
queries (each objective's ``reward_queries``; ``--batch-size`` trajectories per rollout), all with the same KL
weight ``--eta`` (the tilted target ``p_pre exp(r / eta)``):

- ``vard``: ``VARD`` with a ``ValueNetwork(MLP)``, ``value_warmup=--value-warmup`` value steps, then 1 value and
  ``--policy-updates`` policy steps in turn (only value steps query the reward), the value's lr ``--value-lr-scale``
  times the policy's.
- ``draft``: ``DRaFT(truncate=--draft-truncate)`` (default all steps: full backpropagation through the sampler).
- ``ddpo``: ``DDPO`` with its defaults (clip 1e-4, one loss call per rollout, batch-normalised advantages).

Every ``--eval-every`` reward queries (a third of that until ``--dense-until``; and before training), from fixed
noise: mean reward of ``--n-eval`` samples; the KL of the fine-tuned chain to the pretrained one (the sum of the
per-step Gaussian KLs along the fine-tuned model's own trajectories: the path KL, an upper bound of the KL of the
final samples' laws); the Frechet distance in the features of genkit's standard digits classifier
(``genkit.cli.digits_features``' recipe: trained on the train split, seed 0; not the reward classifier) to the
pretrained model's samples from the same noise (``fd_drift``, the drift) and to the digits test split (``fd_data``);
and that classifier's own ``p(y = --digit)`` (``judge_digit``: the classifier reward read by a classifier the
fine-tuning never saw, a reward-hacking check). For scale, the same numbers for the real train-split images the
reward favours (the digit's images; the images past the mass threshold). Evaluation queries are not counted.

Targets (issue 13): (1) VARD reaches DDPO's final reward with <= 1/5 of the reward queries (the first evaluation
at which VARD's reward >= DDPO's final one, for each reward); (2) at equal reward (classifier reward), VARD's
Frechet drift is no worse than DRaFT's: both curves' drift interpolated at reward levels both reach.

    python eval/bench_finetune.py            # about 20 min on one thread of the shared 2-core machine
    python eval/bench_finetune.py --quick    # tiny, under a minute, to a temporary folder
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, markdown_table, write_results  # noqa: E402

import genkit  # noqa: E402
from genkit import metrics  # noqa: E402
from genkit.data import digits, digits_labels  # noqa: E402
from genkit.errors import ConfigError  # noqa: E402
from genkit.finetune import DDPO, VARD, DRaFT, GaussianChain, Reward, ValueNetwork, step_kl  # noqa: E402
from genkit.finetune.vard import VALUE_TARGETS  # noqa: E402
from genkit.models import Diffusion  # noqa: E402
from genkit.nets import MLP, UNet  # noqa: E402
from genkit.solvers import Uniform  # noqa: E402
from genkit.train import TrainConfig, Trainer  # noqa: E402

METHODS = ("vard", "draft", "ddpo")
REWARDS = ("classifier", "mass")
COLORS = {"vard": "tab:blue", "draft": "tab:orange", "ddpo": "tab:green"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default="mlp", choices=("mlp", "unet"), help="the generator's network")
    p.add_argument("--hidden", type=int, default=256, help="MLP width")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--pretrain-steps", type=int, default=12000)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the fine-tuned chain")
    p.add_argument("--t-min", type=float, default=0.02, help="the chain's last time before the final denoising "
                                                             "step (the KL's last step has std ~ sigma(t_min))")
    p.add_argument("--pretrained", default=None, help="a folder: load the pretrained model from it if it holds one, "
                                                      "else pretrain into it (default: a temporary folder)")
    p.add_argument("--rewards", default="classifier,mass", help="comma separated: classifier, mass")
    p.add_argument("--methods", default="vard,draft,ddpo", help="comma separated: vard, draft, ddpo")
    p.add_argument("--digit", type=int, default=3, help="the classifier reward's digit")
    p.add_argument("--mass-quantile", type=float, default=0.8, help="the mass reward's threshold as a quantile "
                                                                    "of the train split's ink")
    p.add_argument("--queries", type=int, default=19200, help="reward-query budget of every method")
    p.add_argument("--eval-every", type=int, default=960, help="reward queries between evaluations")
    p.add_argument("--dense-until", type=int, default=3840, help="evaluate every --eval-every / 3 queries until "
                                                                  "this many (the fast early phase)")
    p.add_argument("--batch-size", type=int, default=64, help="trajectories per rollout")
    p.add_argument("--lr", type=float, default=1e-4, help="the policy's Adam lr (every method)")
    p.add_argument("--eta", type=float, default=0.1, help="KL weight of every method")
    p.add_argument("--value-warmup", type=int, default=None, help="VARD's value-only steps first (default: VARD's)")
    p.add_argument("--policy-updates", type=int, default=None, help="VARD's policy steps per value step (default: "
                                                                    "VARD's)")
    p.add_argument("--value-lr-scale", type=float, default=None, help="VARD's value lr / policy lr (default: "
                                                                      "VARD's)")
    p.add_argument("--value-replay", type=int, default=None, help="VARD's value steps per round on stored rollouts "
                                                                  "(default: VARD's)")
    p.add_argument("--replay-batches", type=int, default=None, help="VARD's stored value batches (default: VARD's)")
    p.add_argument("--value-hidden", type=int, default=128)
    p.add_argument("--value-target", default=None, choices=VALUE_TARGETS, help="what VARD's value regresses on "
                                                                                "(default: VARD's)")
    p.add_argument("--draft-truncate", type=int, default=None, help="DRaFT's K (default: all steps)")
    p.add_argument("--n-eval", type=int, default=512, help="samples per evaluation")
    p.add_argument("--n-kl", type=int, default=256, help="trajectories of the KL estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reduced", default=None, help="label the run as reduced, saying how (in the JSON and markdown)")
    p.add_argument("--rereport", default=None, help="a stored bench_finetune.json: recompute its targets and rewrite "
                                                    "its markdown and plot (no run)")
    p.add_argument("--quick", action="store_true", help="tiny run to a temporary folder (tests the script)")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS}; --quick: a temporary one)")
    args = p.parse_args(argv)
    vard_defaults = inspect.signature(VARD).parameters  # what a user gets
    for name in ("value_warmup", "policy_updates", "value_lr_scale", "value_target", "value_replay",
                 "replay_batches"):
        if getattr(args, name) is None:
            setattr(args, name, vard_defaults[name].default)
    if args.quick:
        args.hidden, args.depth, args.pretrain_steps, args.steps = 64, 1, 200, 6
        args.queries, args.eval_every, args.batch_size, args.n_eval, args.n_kl = 256, 128, 32, 128, 64
        args.value_warmup = 2
    return args


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(args: argparse.Namespace) -> Uniform:
    return Uniform(1.0, args.t_min)


# --- the pretrained model ------------------------------------------------------------------------------------
def pretrain(args: argparse.Namespace, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    data = digits("train").to(args.device)
    torch.manual_seed(args.seed)  # the network's initialisation
    if args.net == "mlp":
        data = data.flatten(1)
        net = MLP(64, hidden=args.hidden, depth=args.depth)
    else:
        net = UNet(8, in_channels=1, block_out_channels=[32, 64])
    model = Diffusion(net, sample_shape=tuple(data.shape[1:]))
    if (out / "checkpoint").exists():
        pre = genkit.load(out, map_location=args.device).eval().requires_grad_(False)
        return pre, {"steps": args.pretrain_steps, "wall_s": float("nan"), "final_loss": None, "loaded_from": str(out),
                     "parameters": sum(p.numel() for p in pre.parameters())}
    cfg = TrainConfig(steps=args.pretrain_steps, batch_size=128, lr=args.pretrain_lr, seed=args.seed,
                      warmup_steps=min(100, args.pretrain_steps // 10), out_dir=str(out),
                      log_every=max(1, args.pretrain_steps // 10), checkpoint_every=None, progress=False,
                      cpu=args.device == "cpu")
    t0 = time.perf_counter()
    result = Trainer(model, cfg).fit(data)
    wall = time.perf_counter() - t0
    pre = genkit.load(out, map_location=args.device).eval()
    for p in pre.parameters():
        p.requires_grad_(False)
    return pre, {"steps": args.pretrain_steps, "wall_s": wall, "final_loss": result.losses[-1][1],
                 "parameters": sum(p.numel() for p in net.parameters())}


# --- rewards -------------------------------------------------------------------------------------------------
def as_images(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], 1, 8, 8)


class ClassifierReward(nn.Module):
    """``p(y = digit | clamp(x))`` of a digits classifier, ``[B]``."""

    def __init__(self, classifier: nn.Module, digit: int):
        super().__init__()
        self.classifier, self.digit = classifier, digit

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(as_images(x).clamp(-1, 1)).softmax(-1)[:, self.digit]


def ink(x: Tensor) -> Tensor:
    return ((x.flatten(1).clamp(-1, 1) + 1) / 2).mean(1)


def make_rewards(args: argparse.Namespace) -> tuple[dict[str, Reward], dict[str, Any]]:
    clf = metrics.train_digits_classifier(digits("test"), digits_labels("test"), steps=600, generator=gen(1))
    with torch.no_grad():
        acc = float((clf(digits("train")).argmax(-1) == digits_labels("train")).float().mean())
    clf = clf.to(args.device)
    tau = float(torch.quantile(ink(digits("train")), args.mass_quantile))
    rewards = {"classifier": Reward(ClassifierReward(clf, args.digit), differentiable=True,
                                    name=f"p(digit={args.digit})"),
               "mass": Reward(lambda x: (ink(x) > tau).to(x.dtype), name=f"1[ink > {tau:.3f}]")}
    info = {"classifier": {"trained_on": "digits test split (359 images), 600 Adam steps",
                           "accuracy_on_train_split": acc, "digit": args.digit,
                           "data_reward": float((digits_labels("train") == args.digit).float().mean())},
            "mass": {"threshold": tau, "quantile_of_train_ink": args.mass_quantile,
                     "data_reward": float((ink(digits("train")) > tau).float().mean())}}
    return rewards, info


# --- evaluation ----------------------------------------------------------------------------------------------
class Evaluator:
    """Reward, path KL to the pretrained chain and Frechet distances of a model, from fixed noise."""

    def __init__(self, pre: nn.Module, args: argparse.Namespace):
        self.pre, self.args = pre, args
        self.chain = GaussianChain("ancestral", args.steps, grid(args))
        # the standard digits classifier (train split, seed 0): the recipe of genkit.cli.digits_features
        self.judge = metrics.train_digits_classifier(digits("train"), digits_labels("train"), generator=gen(0))
        self.features = self.judge.features
        self.device = torch.device(args.device)
        self.data_feats = self.embed(digits("test"))
        self.pre_samples = self.samples(pre, args.n_eval)
        self.pre_feats = self.embed(self.pre_samples)

    def embed(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.features(as_images(x.float().cpu()).clamp(-1, 1)).double()

    @torch.no_grad()
    def samples(self, model: nn.Module, n: int, seed: int = 12345) -> Tensor:
        return self.rollout(model, n, seed).samples

    @torch.no_grad()
    def rollout(self, model: nn.Module, n: int, seed: int) -> Any:
        field, times, end = self.chain.plan(model)
        g = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(n, *model.sample_shape, generator=g, device=self.device)
        return self.chain.rollout(field, x, times, end, {}, generator=g)

    @torch.no_grad()
    def path_kl(self, model: nn.Module) -> float:
        roll = self.rollout(model, self.args.n_kl, seed=777)
        ref_field = self.chain.field(self.pre)
        total = torch.zeros(self.args.n_kl, device=self.device)
        for n in roll.noisy:
            tr = roll.states[n + 1].transition
            ref = self.chain.transition(ref_field, self.chain.at(roll, n), {})
            total += step_kl(tr.mean, ref.mean, tr.std)
        return float(total.mean())

    @torch.no_grad()
    def judge_digit(self, x: Tensor) -> float:
        """The standard classifier's ``p(y = --digit)``, averaged: the reward as a classifier the fine-tuning never
        saw reads it (a gain in the reward it does not share is reward hacking)."""
        return float(self.judge(as_images(x.float().cpu()).clamp(-1, 1)).softmax(-1)[:, self.args.digit].mean())

    def __call__(self, model: nn.Module, rewards: dict[str, Reward]) -> dict[str, float]:
        was = model.training
        model.eval()
        x = self.samples(model, self.args.n_eval)
        feats = self.embed(x)
        out = {f"reward_{k}": float(r(x).mean()) for k, r in rewards.items()}
        out["judge_digit"] = self.judge_digit(x)
        out.update(kl=self.path_kl(model) if model is not self.pre else 0.0,
                   fd_drift=metrics.frechet_distance(feats, self.pre_feats),
                   fd_data=metrics.frechet_distance(feats, self.data_feats))
        model.train(was)
        return out


# --- the methods ---------------------------------------------------------------------------------------------
class FlatValue(nn.Module):
    """A value network on flattened samples (images ``[B, 1, 8, 8]`` -> ``[B, 64]``)."""

    def __init__(self, value: nn.Module):
        super().__init__()
        self.value = value

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.value(x.flatten(1), t)


def build(method: str, pre: nn.Module, reward: Reward, args: argparse.Namespace) -> nn.Module:
    model = copy.deepcopy(pre).train()
    for p in model.parameters():
        p.requires_grad_(True)
    kw = {"eta": args.eta, "solver": "ancestral", "steps": args.steps, "grid": grid(args),
          "batch_size": args.batch_size}
    if method == "vard":
        torch.manual_seed(args.seed + 1)
        value = FlatValue(ValueNetwork(MLP(64, hidden=args.value_hidden, depth=2))).to(args.device)
        return VARD(model, pre, reward, value, value_warmup=args.value_warmup, value_updates=1,
                    policy_updates=args.policy_updates, value_lr_scale=args.value_lr_scale,
                    value_target=args.value_target, value_replay=args.value_replay,
                    replay_batches=args.replay_batches, **kw)
    if method == "draft":
        return DRaFT(model, pre, reward, truncate=args.draft_truncate or args.steps, **kw)
    if method == "ddpo":
        return DDPO(model, pre, reward, **kw)
    raise ValueError(method)


def eval_step(q: int, args: argparse.Namespace) -> int:
    """Reward queries between evaluations after ``q``: ``--eval-every``, a third of it before ``--dense-until``."""
    return max(1, args.eval_every // 3) if q < args.dense_until else args.eval_every


def trainer_steps(method: str, args: argparse.Namespace) -> int:
    """Trainer steps that spend exactly ``--queries`` reward queries."""
    rounds = args.queries // args.batch_size
    if method == "vard":
        return args.value_warmup + (rounds - args.value_warmup) * (1 + args.value_replay + args.policy_updates)
    return rounds


def run_method(method: str, reward_name: str, pre: nn.Module, rewards: dict[str, Reward], ev: Evaluator,
               start: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    obj = build(method, pre, rewards[reward_name], args)
    steps = trainer_steps(method, args)
    curve = [{"queries": 0, "step": 0, "train_s": 0.0, **start}]
    clock = {"eval": 0.0, "t0": time.perf_counter(), "next": eval_step(0, args)}

    def callback(trainer: Trainer, record: Any) -> None:
        q = int(obj.reward_queries)
        if q < clock["next"] and record.step < steps:
            return
        t = time.perf_counter()
        row = {"queries": q, "step": record.step, "train_s": t - clock["t0"] - clock["eval"], **ev(obj.model, rewards)}
        clock["eval"] += time.perf_counter() - t
        clock["next"] = (q // eval_step(q, args) + 1) * eval_step(q, args)
        curve.append(row)
        print(f"  {method:5s} {reward_name:10s} q={q:6d} step={record.step:5d} "
              f"reward={row['reward_' + reward_name]:.3f} kl={row['kl']:.2f} fd_drift={row['fd_drift']:.1f} "
              f"fd_data={row['fd_data']:.1f} ({row['train_s']:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, min_lr_ratio=1.0, ema_decay=None,
                          seed=args.seed + 7, out_dir=tmp, log_every=1, checkpoint_every=None, progress=False,
                          cpu=args.device == "cpu")
        Trainer(obj, cfg, callbacks=[callback]).fit()
    return {"trainer_steps": steps, "reward_queries": int(obj.reward_queries), "config": obj.config(),
            "train_s": curve[-1]["train_s"], "curve": curve}


# --- the targets ---------------------------------------------------------------------------------------------
def first_reaching(curve: list[dict[str, Any]], key: str, level: float) -> dict[str, Any] | None:
    """The first evaluation at which ``curve[key] >= level``."""
    return next((row for row in curve if row[key] >= level), None)


def interp_at(curve: list[dict[str, Any]], key: str, level: float, what: str) -> float | None:
    """``what`` at the first crossing of ``key = level`` along ``curve`` (linear between evaluations)."""
    for a, b in zip(curve[:-1], curve[1:]):
        if a[key] < level <= b[key]:
            w = (level - a[key]) / (b[key] - a[key])
            return a[what] + w * (b[what] - a[what])
    return curve[0][what] if curve and curve[0][key] >= level else None


def targets(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rname, runs in results.items():
        key = f"reward_{rname}"
        if "vard" in runs and "ddpo" in runs and "curve" in runs["vard"] and "curve" in runs["ddpo"]:
            final = runs["ddpo"]["curve"][-1][key]
            hit = first_reaching(runs["vard"]["curve"], key, final)
            q_ddpo = runs["ddpo"]["reward_queries"]
            frac = None if hit is None else hit["queries"] / q_ddpo
            out[f"queries_{rname}"] = {
                "ddpo_final_reward": final, "ddpo_queries": q_ddpo, "vard_final_reward": runs["vard"]["curve"][-1][key],
                "vard_queries_to_reach": None if hit is None else hit["queries"], "fraction": frac,
                "vard_queries_to_reach_interpolated": interp_at(runs["vard"]["curve"], key, final, "queries"),
                "met": frac is not None and frac <= 0.2}
        if "vard" in runs and "draft" in runs and "curve" in runs["draft"]:
            cv, cd = runs["vard"]["curve"], runs["draft"]["curve"]
            lo = cv[0][key]
            top = min(max(r[key] for r in cv), max(r[key] for r in cd))
            levels = [lo + (top - lo) * f for f in (0.25, 0.5, 0.75, 1.0)] if top > lo else []
            rows = [{"reward": lv, "fd_drift_vard": interp_at(cv, key, lv, "fd_drift"),
                     "fd_drift_draft": interp_at(cd, key, lv, "fd_drift"),
                     "kl_vard": interp_at(cv, key, lv, "kl"), "kl_draft": interp_at(cd, key, lv, "kl")}
                    for lv in levels]
            ok = bool(rows) and all(r["fd_drift_vard"] is not None and r["fd_drift_draft"] is not None and
                                    r["fd_drift_vard"] <= r["fd_drift_draft"] for r in rows)
            out[f"drift_{rname}"] = {"levels": rows, "met": ok}
        if "vard" in runs and "ddpo" in runs and "curve" in runs["vard"] and "curve" in runs["ddpo"]:
            cv, start = runs["vard"]["curve"], runs["ddpo"]["curve"][0][key]
            rows = []
            for row in runs["ddpo"]["curve"][1:]:
                if row[key] <= start:
                    continue
                q = interp_at(cv, key, row[key], "queries")
                t = interp_at(cv, key, row[key], "train_s")
                hit = first_reaching(cv, key, row[key])
                rows.append({"reward": row[key], "ddpo_queries": row["queries"], "vard_queries": q,
                             "ratio": None if q is None else q / row["queries"],
                             "vard_queries_first_eval": None if hit is None else hit["queries"],
                             "ratio_first_eval": None if hit is None else hit["queries"] / row["queries"],
                             "ddpo_train_s": row["train_s"], "vard_train_s": t})
            within = [r["reward"] for r in rows if r["ratio_first_eval"] is not None and r["ratio_first_eval"] <= 0.2]
            out[f"matched_{rname}"] = {"levels": rows, "highest_reward_within_one_fifth": max(within, default=None)}
    return out


# --- report --------------------------------------------------------------------------------------------------
def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(13, 3.6 * len(results)), squeeze=False)
    for i, (rname, runs) in enumerate(results.items()):
        key = f"reward_{rname}"
        for method, run in runs.items():
            if "curve" not in run:
                continue
            c = run["curve"]
            r = [row[key] for row in c]
            for j, x in enumerate(("queries", "kl", "fd_drift")):
                axes[i, j].plot([row[x] for row in c], r, "o-", ms=3, label=method, color=COLORS[method])
        for j, x in enumerate(("reward queries", "path KL to pretrained", "Frechet drift to pretrained")):
            axes[i, j].set_xlabel(x)
            axes[i, j].set_ylabel(f"reward ({rname})")
            axes[i, j].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(payload: dict[str, Any]) -> str:
    lines = []
    pre = payload["pretrained"]
    lines.append(f"Pretrained: {pre['net']}, {pre['steps']} steps in {pre['wall_s']:.0f} s; Frechet distance to "
                 f"the test split {pre['fd_data']:.1f} (noise floor: a train subset of the same size "
                 f"{pre['fd_floor']:.1f}).")
    rw = payload["rewards"]
    lines.append(f"Reward classifier (trained on the test split): accuracy "
                 f"{rw['classifier']['accuracy_on_train_split']:.3f} on the train split. Mass threshold "
                 f"{rw['mass']['threshold']:.3f} ({rw['mass']['data_reward']:.2f} of the train split pass).")
    if payload.get("reduced"):
        lines.append(f"\n**Reduced run**: {payload['reduced']}")
    if payload.get("note"):
        lines.append(f"\nNote: {payload['note']}")
    lines.append("")
    for rname, runs in payload["results"].items():
        lines.append(f"## reward `{rname}`\n")
        header = ["method", "queries", "trainer steps", "train s", "reward", "judge p(digit)", "path KL", "FD drift",
                  "FD data"]
        rows = []
        for method, run in runs.items():
            if "curve" not in run:
                rows.append([method, "refused", "", "", "", "", "", "", run.get("error", "")[:90]])
                continue
            c0, c = run["curve"][0], run["curve"][-1]
            if method == next(m for m in runs if "curve" in runs[m]):
                rows.append(["pretrained", 0, 0, 0.0, c0[f"reward_{rname}"], c0["judge_digit"], 0.0, c0["fd_drift"],
                             c0["fd_data"]])
            rows.append([method, run["reward_queries"], run["trainer_steps"], run["train_s"], c[f"reward_{rname}"],
                         c["judge_digit"], c["kl"], c["fd_drift"], c["fd_data"]])
        real = payload["rewards"]["real_rewarded_images"][rname]
        rows.append([f"(real rewarded train images, {real['images']})", "", "", "", real["reward"],
                     real["judge_digit"], "", real["fd_drift"], ""])
        lines.append(markdown_table(header, rows))
        lines.append("")
        for method, run in runs.items():
            if "curve" in run:
                curve = ", ".join(f"{r['queries']}: {r[f'reward_{rname}']:.3f}" for r in run["curve"])
                lines.append(f"- {method} reward by queries: {curve}")
        lines.append("")
    lines.append("## targets\n")
    for name, t in payload["targets"].items():
        if name.startswith("queries_"):
            frac = "never" if t["fraction"] is None else f"{t['fraction']:.3f}"
            lines.append(f"- **{'met' if t['met'] else 'missed'}** ({name[8:]} reward) VARD reaches DDPO's final "
                         f"reward {t['ddpo_final_reward']:.3f} (after {t['ddpo_queries']} queries) at "
                         f"{t['vard_queries_to_reach']} queries (the first evaluation past it; linear between "
                         f"evaluations: {_f(t['vard_queries_to_reach_interpolated'])}): fraction {frac} "
                         "(target <= 0.2).")
        elif name.startswith("matched_"):
            hi = t["highest_reward_within_one_fifth"]
            rows = [[r["reward"], r["ddpo_queries"], _f(r["vard_queries_first_eval"]), _r(r["ratio_first_eval"]),
                     _f(r["vard_queries"]), _r(r["ratio"]), r["ddpo_train_s"], _f(r["vard_train_s"])]
                    for r in t["levels"]]
            lines.append(f"- ({name[8:]} reward) at matched reward: the queries VARD needs to reach each of DDPO's "
                         "evaluated rewards (the first evaluation past it, and linear between evaluations) over "
                         "DDPO's. Highest DDPO reward VARD matches with <= 1/5 of the queries (first evaluation): "
                         f"{'none' if hi is None else f'{hi:.3f}'}.\n")
            lines.append(markdown_table(["DDPO reward", "DDPO queries", "VARD queries", "ratio",
                                         "VARD queries (interp.)", "ratio (interp.)", "DDPO train s",
                                         "VARD train s (interp.)"], rows))
            lines.append("")
        else:
            levels = "; ".join(
                f"reward {r['reward']:.3f}: VARD {_f(r['fd_drift_vard'])} vs DRaFT {_f(r['fd_drift_draft'])}"
                for r in t["levels"])
            lines.append(f"- **{'met' if t['met'] else 'missed'}** ({name[6:]} reward) Frechet drift at equal reward, "
                         f"VARD <= DRaFT: {levels or 'no common reward range'}.")
    if payload.get("summary"):
        lines.append(f"\n## reading\n\n{payload['summary']}")
    lines.append("\nPlots: `bench_finetune.png` (reward against queries, path KL, Frechet drift).")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _r(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def rereport(path: Path) -> None:
    """Recompute the targets of a stored run and rewrite its markdown and plot (the run's command and machine
    kept, the re-rendering noted)."""
    import json
    import shlex

    from bench_common import machine_info

    record = json.loads(path.read_text())
    record["targets"] = targets(record["results"], argparse.Namespace(**record["settings"]))
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    m, now = record["machine"], machine_info()
    head = (f"# {record['benchmark']}\n\nCommand: `{record['command']}`\n\nMachine: {m['cpu']}, {m['logical_cpus']} "
            f"logical CPUs, torch {m['torch']} ({m['torch_threads']} thread(s)), genkit {m['versions']['genkit']}, "
            f"git {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''}, {m['date_utc']}.\n\nReport re-rendered "
            f"from the JSON by `python eval/bench_finetune.py --rereport {shlex.quote(str(path))}` at git "
            f"{now['git_commit']}{' (dirty)' if now['git_dirty'] else ''}.\n\n")
    path.with_suffix(".md").write_text(head + report(record).rstrip() + "\n", encoding="utf-8")
    plot(record["results"], path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rereport:
        rereport(Path(args.rereport))
        return
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pre, pre_info = pretrain(args, Path(args.pretrained or tmp))
    print(f"pretrained in {pre_info['wall_s']:.0f} s", flush=True)
    rewards, reward_info = make_rewards(args)
    ev = Evaluator(pre, args)
    floor = metrics.frechet_distance(ev.embed(digits("train")[:len(ev.data_feats)]), ev.data_feats)
    start = ev(pre, rewards)
    ideal = {}
    for rname, sel in (("classifier", digits_labels("train") == args.digit),
                       ("mass", ink(digits("train")) > reward_info["mass"]["threshold"])):
        real = digits("train")[sel]
        ideal[rname] = {"images": int(sel.sum()), "reward": float(rewards[rname](real.flatten(1)).mean()),
                        "judge_digit": ev.judge_digit(real),
                        "fd_drift": metrics.frechet_distance(ev.embed(real), ev.pre_feats)}
    reward_info["real_rewarded_images"] = ideal
    pre_info.update(net=f"MLP {args.hidden} x {args.depth}" if args.net == "mlp" else "UNet 32,64",
                    fd_data=start["fd_data"], fd_floor=floor, rewards={k: start[f"reward_{k}"] for k in rewards})
    print(f"pretrained: {start}, floor {floor:.1f}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for rname in args.rewards.split(","):
        results[rname] = {}
        for method in args.methods.split(","):
            try:
                results[rname][method] = run_method(method, rname, pre, rewards, ev, start, args)
            except ConfigError as e:
                if method != "draft" or rewards[rname].differentiable:
                    raise
                results[rname][method] = {"error": str(e)}
                print(f"  draft refused the {rname} reward: {e}", flush=True)
    payload = {"settings": vars(args), "pretrained": pre_info, "rewards": reward_info,
               "evaluation": {"samples": args.n_eval, "kl_trajectories": args.n_kl,
                              "features": "the standard digits classifier (genkit.cli.digits_features' recipe: "
                                          "train split, seed 0), not the reward classifier",
                              "judge_digit": "that classifier's p(digit), averaged: the classifier reward as a "
                                             "classifier the fine-tuning never saw reads it",
                              "fd_drift": "to the pretrained model's samples from the same noise",
                              "fd_data": "to the digits test split"},
               "results": results, "targets": targets(results, args), "total_s": time.perf_counter() - t_start}
    if args.quick:
        payload["reduced"] = "--quick (tiny: tests the script only)"
    elif args.reduced:
        payload["reduced"] = args.reduced
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, out_dir / "bench_finetune.png")
    json_path, md_path = write_results("bench_finetune", payload, report(payload), out_dir)
    print(f"wrote {json_path}, {md_path} in {payload['total_s']:.0f} s")


if __name__ == "__main__":
    main()
