"""Measure a genkit checkpoint against held-out data and write the numbers as JSON.

Draws --n samples with the chosen solver and compares them with held-out data of --data (never trained
on: a fresh draw for toy sets, the test split for digits):

  vectors  sliced W2, energy distance and MMD
  digits   Frechet distance in the features of genkit.metrics' small digits classifier
  tokens   (mdlm) per-position token-frequency total variation, the data set's own statistics (motifs: the
           share of samples holding a motif), and always the held-out negative ELBO in nats per sequence
           ("nll" with "method": "ELBO (upper bound)"), through the family's sample_report
  --nll    negative log-likelihood of held-out data through the probability-flow ODE, in nats and
           bits/dim (exact divergence for vectors, Hutchinson's estimator for images)

Every distance comes with its noise floor: the same distance between two held-out sets, what a perfect
model would score at this sample size.

The model is scored with its own sampler unless --solver says otherwise (a secant model's learned jumps, a
searched solver's own steps and times), and the report says which ("sampler": learned jumps, ODE solver,
SDE solver or restart; "solver", "steps", "grid", "t_max"; "nfe" the network evaluations). --data defaults to
what the checkpoint's run trained on (train_data.json, written by train/train.py and train/secant.py); another
data set than that is an error unless --allow-other-data; a checkpoint saved by hand (genkit.save, a Trainer's
out_dir) has no train_data.json: pass --data. A run of train.py --tokens FILE is scored against the file's
held-out 10 % (the split train.py held out, genkit.data.load_tokens split="test"), read with its recorded alphabet.

The one-step models MeanFlow, SMT and SMD are scored with 1 learned jump by default ("sampler": "learned jumps",
"steps": 1, "nfe": 1); --steps k scores k jumps. MeanFlow's velocity view also takes ODE solvers (--solver heun),
and its --nll is that velocity view's probability-flow density, not the density of its jump samples (the report's
"nll" says so). SMT and SMD take --solver restart --steps k but no ODE solver, and have no density: their report
holds "nll": null with "note_nll" saying why, and --nll is an error. An SMD checkpoint is scored without its
teacher (which is never saved).

A normalizing flow (--family nsf / realnvp) has an exact density: the report always holds the held-out NLL
in nats from its log_prob ("nll" with "method": "exact"; a class-conditional flow is scored as the mixture
sum_k pi_k p(x | k) over the training set's class frequencies pi). A flow trained by an energy (train.py
--energy) is scored against that energy instead of data: "energy" holds the ESS of n importance weights
log w = -U(x) - log q(x), log Z with its standard error (genkit.metrics.log_z), the reference log Z (the energy's
exact one, else 2-D quadrature) and the reverse KL estimate log Z_ref - mean(log w). A stochastic normalizing
flow (--family snf) is scored the same way from its exact path weights (model.sample_with_log_weights); it has no
density, so its report holds "nll": null and "note_nll" saying why. A run trained with samples of the target
(train.py --samples FILE, an snf by --objective ml / mixed), or --samples FILE here for any model trained by an
energy, is also scored on the file's held-out test split (the split train.py held out): "nll" the held-out NLL in
nats (exact for a flow with a density; for an snf the upper bound of its reverse paths, model.nll_bound), and the
distances of the model's (unweighted) samples to those samples, with their noise floor.

A GFlowNet (--family gflownet) learns its environment's reward, not data: it is scored against that target
(model.target_report): on an enumerable environment the policy's exact terminal distribution P_T (dynamic
programming over the DAG) and the empirical one of --n samples against R / Z, as L1 in both conventions
("sum": torchgfn's, in [0, 2]; "mean": the sum over the number of terminal objects, the GFlowNet papers' code),
JSD, the learned and the exact log Z, and the modes found against the number of samples drawn; otherwise reward
statistics of the samples.

A class-conditional checkpoint is sampled with class ids drawn at the held-out data's class frequencies (so
the distances compare like with like), or all of --class; --guidance sets the classifier-free guidance scale
(model.sample(labels=, guidance=)); on digits the report adds the share of samples the digits classifier reads
as their class. --nll on a conditional model scores the model's unconditional density through its null label.

examples:
  python eval/evaluate.py --checkpoint runs/default
  python eval/evaluate.py --checkpoint runs/default --data moons --solver euler --steps 8 --nll
  python eval/evaluate.py --checkpoint runs/secant               # a secant model: scored with its learned jumps
  python eval/evaluate.py --checkpoint runs/meanflow --steps 2    # a one-step model with 2 jumps (default 1)
  python eval/evaluate.py --checkpoint runs/smd_by_hand --data moons   # saved by hand: no train_data.json
  python eval/evaluate.py --checkpoint runs/digits --data digits --n 500 --out runs/digits/eval.json
  python eval/evaluate.py --checkpoint runs/nsf_moons              # a flow: distances and exact held-out NLL
  python eval/evaluate.py --checkpoint runs/nsf_double_well        # a flow trained by an energy: ESS, log Z
  python eval/evaluate.py --checkpoint runs/snf_double_well        # a stochastic flow: ESS, log Z, no NLL
  python eval/evaluate.py --checkpoint runs/snf_dw --samples md.npy  # and its NLL bound on held-out samples
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import genkit
import genkit.models.gflownet
from genkit import metrics
from genkit.cli import (
    check_data_matches,
    checkpoint_dir,
    energy_metrics,
    held_out_nll,
    named_grids,
    resolve_sampler,
    run_main,
    sample_distances,
    samples_held_out,
    script_device,
    table_held_out,
    target_summary,
    tokens_held_out,
    trained_data,
)
from genkit.data import DATASETS, digits, digits_labels, held_out, load_labelled
from genkit.errors import ConfigError, ShapeError
from genkit.solvers import SOLVERS


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=_Formatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint folder, or a train.py run folder holding checkpoint/")
    p.add_argument("--data", help=f"the data the model learned, one of {', '.join(DATASETS.names())} (default: what "
                                  "its run trained on, from train_data.json beside the checkpoint)")
    p.add_argument("--table", metavar="FILE", help="score against the test split of your own table (.csv / .npy, as "
                                                   "train.py --table; default: the run's, from train_data.json)")
    p.add_argument("--samples", metavar="FILE",
                   help="a model trained by an energy: also score it on the test split of this file of samples of "
                        "the energy's target (.csv / .npy [N, D], as train.py --samples; default: the run's, from "
                        "train_data.json)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="score the model against another --data than its run trained on")
    p.add_argument("--n", type=int, default=2000, help="samples to draw (and held-out size for toy sets)")
    p.add_argument("--solver", help=f"one of {', '.join(SOLVERS.names())}, a searched solver saved by name or its "
                                    "folder, jumps (a flow-map or one-step model's learned jumps) or restart (smt / "
                                    "smd) (default: the model's own sampler: heun for flow matching and diffusion, "
                                    "the learned jumps of secant models, 1 learned jump for meanflow / smt / smd; "
                                    "the report says which)")
    p.add_argument("--steps", type=int, help="solver steps or jumps (default: the sampler's own: a searched solver's "
                                             "N, a secant model's first trained count, 1 jump for meanflow / smt / "
                                             "smd, else 32)")
    p.add_argument("--grid", help=f"time grid, one of {', '.join(named_grids())} (default: uniform over the model's "
                                  "time range; refused where the solver runs on its own times)")
    p.add_argument("--t-max", type=float, metavar="T",
                   help="start the solver at t = T (default: the model's start; a stochastic solver singular there "
                        "starts at 0.99 and says so)")
    p.add_argument("--class", dest="label", type=int, metavar="K",
                   help="conditional models: sample class K only (default: the held-out data's class frequencies)")
    p.add_argument("--guidance", type=float, metavar="W",
                   help="conditional models: classifier-free guidance scale (1 = conditional, default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, held-out draws and estimators")
    p.add_argument("--out", metavar="FILE",
                   help="metrics JSON (default: evaluation.json next to the checkpoint folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    g = p.add_argument_group("likelihood")
    g.add_argument("--nll", action="store_true", help="also compute the ODE negative log-likelihood of held-out data")
    g.add_argument("--nll-n", type=int, default=1000, help="held-out samples for --nll")
    g.add_argument("--nll-solver", default="dopri5",
                   help="ODE solver for --nll (adaptive, or fixed-step with --nll-steps)")
    g.add_argument("--nll-steps", type=int, default=100, help="steps of a fixed-step --nll-solver")
    g.add_argument("--nll-batch-size", type=int, default=500, help="held-out samples per likelihood solve")
    return p.parse_args(argv)


def evaluation_labels(model: Any, args: argparse.Namespace) -> tuple[torch.Tensor | None, str | None]:
    """Class ids to sample a conditional model with, and how they were chosen; None for unconditional models
    (where --class / --guidance are errors)."""
    k = getattr(model, "num_classes", None)
    if k is None:
        for flag, value in (("--class", args.label), ("--guidance", args.guidance)):
            if value is not None:
                raise ConfigError(f"{flag} {value}: this {model.family} model is unconditional (trained without "
                                  "--conditional); drop the flag")
        return None, None
    if args.label is not None:
        if not 0 <= args.label < k:
            raise ConfigError(f"--class {args.label} is not a class of this model: 0..{k - 1}")
        return torch.full((args.n,), args.label, dtype=torch.long), f"class {args.label}"
    try:
        pool = load_labelled(args.data).labels
        how = f"{args.data}'s class frequencies"
    except ConfigError:  # a data set without classes (an image folder): uniform over the model's classes
        pool, how = torch.arange(k), "uniform over the classes"
    return pool[torch.randint(len(pool), (args.n,), generator=torch.Generator().manual_seed(args.seed))], how


def null_label(model: Any) -> int:
    """The null label of a conditional model for --nll (its unconditional density), or a ConfigError."""
    if getattr(model, "null_label", None) is None:
        raise ConfigError("--nll on a class-conditional model trained without class dropout: it has no "
                          "unconditional density (no null label); drop --nll or train with --class-dropout > 0")
    return int(model.null_label)


def exact_nll(model: Any, data: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Held-out NLL from a model's exact ``log_prob`` (a normalizing flow): unconditional, or for a
    class-conditional one the mixture ``log sum_k pi_k p(x | k)`` over the training set's class frequencies."""
    k = getattr(model, "num_classes", None)
    how = "exact (change of variables)"
    if k is None:
        def log_prob(batch: torch.Tensor) -> torch.Tensor:
            return model.log_prob(batch)
    else:
        try:
            counts = torch.bincount(load_labelled(args.data).labels, minlength=k).double()
        except ConfigError:
            counts = torch.ones(k, dtype=torch.float64)
        log_pi = (counts / counts.sum()).log().to(data.device)
        how += ", mixture over the classes at the training frequencies"

        def log_prob(batch: torch.Tensor) -> torch.Tensor:
            per_class = torch.stack([model.log_prob(batch, labels=c) for c in range(k)], 1)  # [B, K]
            return torch.logsumexp(per_class.double() + log_pi, 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        result = metrics.nll(log_prob, data, batch_size=args.nll_batch_size)
    return {"nats": result.nats, "bits_per_dim": result.bits_per_dim, "stderr_nats": result.stderr_nats,
            "n": len(data), "method": how, "time_s": time.perf_counter() - t0}


def evaluate_energy(args: argparse.Namespace, model: Any, ckpt: Path, chosen: Any, device: torch.device) -> None:
    """A model trained by an energy: importance weights against it (genkit.cli.energy_metrics), no data."""
    for flag, value in (("--nll", args.nll or None), ("--class", args.label), ("--guidance", args.guidance)):
        if value is not None:
            raise ConfigError(f"{flag}: {ckpt} was trained by the energy {model.energy.name!r}, not on data; its "
                              "report is the importance-weight ESS and log Z (pass --data NAME to score its samples "
                              "against a data set too)")
    samples = energy_samples(args, ckpt)
    t0 = time.perf_counter()
    result = energy_metrics(model, args.n, torch.Generator(device=device).manual_seed(args.seed))
    report = {"checkpoint": str(ckpt), "family": model.family, "n": args.n, **chosen.record(),
              "sampled_with": chosen.describe(), "time_s": time.perf_counter() - t0,
              "weights": "raw" if args.raw_weights or not (ckpt / "ema.safetensors").is_file() else "ema",
              "energy": result}
    if samples is not None:  # held-out samples of the target: the NLL (exact, or a bound) and sample distances
        ref, floor = samples_held_out(samples, model.energy.dim, args.n, args.seed)
        report["samples"] = samples
        report["nll"] = held_out_nll(model, ref[:args.nll_n].to(device),
                                     torch.Generator(device=device).manual_seed(args.seed))
        x = model.sample(args.n, sampler=chosen.sampler, generator=torch.Generator(device=device).manual_seed(
            args.seed)).cpu()
        report.update(sample_distances(x, ref, None, args.seed))
        report["noise_floor"] = sample_distances(floor, ref, None, args.seed)
    if report.get("nll") is None and not getattr(model, "exact_likelihood", False):  # no density to score (an snf)
        report.update(nll=None, note_nll=getattr(model, "no_likelihood", "none: this model has no exact density"))
    out = Path(args.out) if args.out else ckpt.parent / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    ref = result["log_z_reference"]
    print(f"{args.n} samples of {model.family} against the energy {model.energy.name!r} with {chosen.describe()}: "
          f"ESS {result['ess']:.1f} ({100 * result['ess_fraction']:.1f}%), log Z {result['log_z']:.4f} +- "
          f"{result['log_z_stderr']:.4f}" + ("" if ref is None else f" (reference {ref:.4f}, "
                                                                  f"{result['log_z_reference_method']}; reverse KL "
                                                                  f"{result['reverse_kl']:.4f})"))
    if report.get("nll") is not None:
        print(f"held-out samples of {samples}: NLL {report['nll']['nats']:.4f} nats ({report['nll']['method']}, "
              f"{report['nll']['n']} samples), " + ", ".join(f"{k} {report[k]:.4g} (floor {v:.4g})"
                                                             for k, v in report["noise_floor"].items()))
    print(f"metrics: {out}")


def evaluate_target(args: argparse.Namespace, model: Any, ckpt: Path, chosen: Any, device: torch.device) -> None:
    """A model that trains toward its own target (a GFlowNet's environment): its ``target_report`` on --n samples
    (exact L1 in both conventions, JSD, learned and exact log Z on an enumerable environment; reward statistics
    otherwise) and the modes found against the number of samples drawn."""
    for flag, value in (("--nll", args.nll or None), ("--class", args.label), ("--guidance", args.guidance),
                        ("--data", args.data), ("--table", args.table), ("--samples", args.samples)):
        if value is not None:
            raise ConfigError(f"{flag}: {ckpt} holds a {model.family} model, which learns its own target (its "
                              "environment's reward), not data; it is scored against that target exactly: drop "
                              f"{flag}")
    t0 = time.perf_counter()
    sol = model.sample(args.n, sampler=chosen.sampler, return_solution=True,
                       generator=torch.Generator(device=device).manual_seed(args.seed))
    x = sol.samples.cpu()
    report = {"checkpoint": str(ckpt), "family": model.family, "n": args.n, **chosen.record(),
              "sampled_with": chosen.describe(), "nfe": sol.nfe,
              "weights": "raw" if args.raw_weights or not (ckpt / "ema.safetensors").is_file() else "ema",
              **model.cpu().target_report(x), "time_s": time.perf_counter() - t0}
    if "modes_in_samples" in report:  # the environment defines modes
        modes = genkit.models.gflownet.modes_found(model.env, x)
        marks = sorted({min(args.n, k) for k in (10, 100, 1000, 10_000, 100_000, args.n)})
        report["modes_found_vs_samples"] = {str(k): int(modes[k - 1]) for k in marks}
    out = Path(args.out) if args.out else ckpt.parent / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"{args.n} samples of {model.family} on {model.env!r} with {chosen.describe()} (NFE {sol.nfe}): "
          f"{target_summary(report)}")
    print(f"metrics: {out}")


def energy_samples(args: argparse.Namespace, ckpt: Path) -> str | None:
    """The file of samples of the energy's target to score on: --samples, else the run's (train_data.json); another
    file than the run trained on is an error unless --allow-other-data."""
    recorded = (trained_data(ckpt) or {}).get("samples")
    if args.samples is None:
        return recorded
    mine = str(Path(args.samples).expanduser().absolute())
    if recorded is not None and mine != recorded and not args.allow_other_data:
        raise ConfigError(f"--samples {args.samples}: {ckpt} was trained on the samples {recorded}, whose test split "
                          "it never saw; pass that file (or drop --samples), or add --allow-other-data")
    return mine


def table_split_seed(args: argparse.Namespace, record: dict[str, Any]) -> int:
    """The seed of the train / test split of ``--table``: the run's (train.py records it: the run's --seed) when it
    is the run's table, else ``--seed``."""
    same = "table" in record and Path(args.table).expanduser().absolute() == Path(record["table"])
    return int(record.get("split_seed", args.seed)) if same else args.seed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for flag in ("n", "steps", "nll_n", "nll_steps", "nll_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer; got {getattr(args, flag)}")
    device = script_device(args.device)
    if args.nll and genkit.get_solver(args.nll_solver).stochastic:
        raise ConfigError(f"--nll-solver {args.nll_solver} is stochastic; likelihoods need an ODE solver, "
                          "e.g. dopri5")
    ckpt = checkpoint_dir(args.checkpoint)
    model = genkit.load(ckpt, ema=not args.raw_weights, map_location=device)
    chosen = resolve_sampler(model, args.solver, args.steps, args.grid, args.t_max)  # as in every script
    if chosen.note:
        print(f"note: {chosen.note}")
    if getattr(model, "energy", None) is not None and args.data is None:
        return evaluate_energy(args, model, ckpt, chosen, device)
    if callable(getattr(model, "target_report", None)):  # a GFlowNet: scored against its own target, exactly
        return evaluate_target(args, model, ckpt, chosen, device)
    if args.samples is not None:
        raise ConfigError(f"--samples {args.samples} scores a model trained by an energy on samples of its target; "
                          f"this {model.family} model " + ("is scored against --data here: drop one of them"
                                                           if getattr(model, "energy", None) is not None else
                                                           "was trained on data: use --data or --table"))
    if args.nll and getattr(model, "no_likelihood", None) is not None:  # before any sampling: say why, at once
        raise ConfigError(f"--nll: the {model.family} model has no likelihood to score ({model.no_likelihood}); "
                          "drop --nll (its report holds \"nll\": null and why)")
    record = trained_data(ckpt) or {}
    tokens = record.get("tokens") if args.table is None and args.data is None else None  # train.py --tokens FILE
    if args.table is None and args.data is None and "table" in record:
        args.table = record["table"]
    if args.table is not None:
        if args.data is not None:
            raise ConfigError(f"--data {args.data} and --table {args.table} both name the held-out data; keep one")
        if "table" in record and Path(args.table).absolute() != Path(record["table"]) and not args.allow_other_data:
            raise ConfigError(f"--table {args.table}: {ckpt} was trained on the table {record['table']}; pass that "
                              "one, or --allow-other-data")
    elif tokens is None:
        args.data = check_data_matches(ckpt, args.data, args.allow_other_data)
    if tokens is not None:
        ref, floor = tokens_held_out(tokens, args.n, args.seed, record.get("alphabet"), record.get("holdout"))
    else:
        ref, floor = (held_out(args.data, args.n, args.seed) if args.table is None
                      else table_held_out(args.table, args.n, args.seed, split_seed=table_split_seed(args, record)))
    if tuple(ref.shape[1:]) != model.sample_shape:
        what = (f"the token file {tokens}" if tokens is not None else f"--data {args.data}" if args.table is None
                else f"--table {args.table}")
        raise ShapeError(f"{ckpt} makes samples of shape {model.sample_shape} but {what} has "
                         f"{tuple(ref.shape[1:])}; pass the data set the model was trained on")
    is_image = ref.ndim == 4
    labels, labels_from = evaluation_labels(model, args)
    t0 = time.perf_counter()
    sol = model.sample(args.n, sampler=chosen.sampler, return_solution=True, labels=labels,
                       **({} if args.guidance is None else {"guidance": args.guidance}),
                       generator=torch.Generator(device=device).manual_seed(args.seed))
    x = sol.samples.cpu()
    x = x.float() if x.is_floating_point() else x  # token ids stay long
    report: dict[str, Any] = {
        "checkpoint": str(ckpt), "family": model.family, "data": args.data or args.table or tokens, "n": args.n,
        **chosen.record(),
        "sampled_with": chosen.describe(), "nfe": sol.nfe, "sample_time_s": time.perf_counter() - t0,
        "weights": "raw" if args.raw_weights or not (ckpt / "ema.safetensors").is_file() else "ema",
    }
    if labels is not None:
        report.update({"labels": labels_from, "guidance": args.guidance})
    if callable(getattr(model, "sample_report", None)):  # the family's own report (token models: mdlm)
        report.update(model.sample_report(x, ref, floor, data=args.data, nll_n=args.nll_n,
                                          generator=torch.Generator(device=device).manual_seed(args.seed)))
    elif is_image and args.data != "digits":
        report["note"] = ("no sample-quality metric for these images: only digits have a built-in feature network; "
                          "use genkit.metrics.fid with inception_features")
    else:
        classifier = (metrics.train_digits_classifier(digits("train"), digits_labels("train"),
                                                      generator=torch.Generator().manual_seed(0))
                      if is_image else None)
        features = classifier.features if classifier is not None else None
        report.update(sample_distances(x, ref, features, args.seed))
        if classifier is not None and labels is not None and args.data == "digits":
            with torch.no_grad():
                read = classifier(x.clamp(-1, 1)).argmax(1)
            report["class_accuracy"] = float((read == labels.cpu()).double().mean())
        report["noise_floor"] = sample_distances(floor, ref, features, args.seed)
    if getattr(model, "exact_likelihood", False):
        report["nll"] = exact_nll(model, ref[:args.nll_n].to(device), args)
    elif getattr(model, "no_likelihood", None) is not None:  # no density at all (an snf, smt, smd)
        report.update(nll=None, note_nll=model.no_likelihood)
    elif args.nll and "nll" not in report:
        data = ref[:args.nll_n].to(device)
        mode = "hutchinson" if is_image else "exact"
        g = torch.Generator(device=device).manual_seed(args.seed)
        t0 = time.perf_counter()
        null = None if labels is None else null_label(model)

        def cond(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            return {} if null is None else {"labels": torch.full((len(batch),), null, dtype=torch.long,
                                                                 device=batch.device)}
        result = metrics.nll(lambda batch: model.log_prob(batch, solver=args.nll_solver, steps=args.nll_steps,
                                                          divergence_mode=mode, generator=g, **cond(batch)),
                             data, batch_size=args.nll_batch_size)
        report["nll"] = {"nats": result.nats, "bits_per_dim": result.bits_per_dim, "stderr_nats": result.stderr_nats,
                         "n": len(data), "divergence": mode, "solver": args.nll_solver,
                         "method": f"probability-flow ODE, {mode} divergence",
                         "time_s": time.perf_counter() - t0}
        if chosen.kind == "learned jumps":  # the distances above score the jumps, this number the velocity view
            report["nll"]["note"] = (f"the density of the model's velocity view through the probability-flow ODE "
                                     f"({args.nll_solver}), not of the samples of its {chosen.describe()}")
    out = Path(args.out) if args.out else ckpt.parent / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    shown = {k: v for k, v in report.items()
             if k in ("sliced_w2", "energy_distance", "mmd", "frechet_digits", "token_tv", "motif_rate")}
    print(f"{args.n} samples with {chosen.describe()} (NFE {sol.nfe}): "
          + ", ".join(f"{k} {v:.4g} (floor {report['noise_floor'][k]:.4g})" for k, v in shown.items()))
    if report.get("nll") is not None:
        print(f"NLL of {report['nll']['n']} held-out samples: {report['nll']['nats']:.4f} nats "
              f"({report['nll']['bits_per_dim']:.4f} bits/dim, {report['nll']['method']})")
    print(f"metrics: {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
