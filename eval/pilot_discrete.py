"""Pilot of the KL weights for ``eval/bench_discrete.py`` (issue 12): DRAKES and SEPO on the DNA-like task at
several KL weights, each followed over its fine-tuning by what a user can watch (the *fine-tuning* oracle's median
and the 3-mer correlation with held-out data), never by the evaluation oracle. bench_discrete's target rows take
the weight this pilot picks: the largest fine-tuning-oracle median at the end of the run among the weights whose
final model keeps a 3-mer correlation >= ``--kmer3-floor`` (0.85: the target's 0.8 plus a margin for the sampling
noise of a correlation measured on 128 samples; the pretrained model's reads 0.981 here and 0.970 on
bench_discrete's draw). The final model is the one a user takes away; the table also shows the lowest 3-mer
correlation on the way: the KL's pull builds up with the drift, so the reward often overshoots early and the run
comes back toward the pretrained model's spectrum).

The same pretraining as bench_discrete (its ``pretrain``, same seed and settings), the same fine-tuning settings
(its defaults unless given: 100 steps, DRAKES batch 16, truncate 16, SEPO group 8, inner 2), every ``--every``
steps ``--n`` samples of S = 50 steps drawn from the model being trained (a separate generator, so the training
draws are the ones bench_discrete makes), scored with the fine-tuning oracle and the 3-mer correlation.

    python eval/pilot_discrete.py --method drakes --weights 0.05 0.02 0.01 0.005
    python eval/pilot_discrete.py --method sepo --weights 0.005 0.01 0.02 0.05
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_discrete as bd  # noqa: E402
from bench_common import RESULTS, markdown_table, write_results  # noqa: E402

from genkit.data import held_out  # noqa: E402
from genkit.data.dna_task import dna  # noqa: E402
from genkit.finetune import DRAKES, SEPO, Reward  # noqa: E402
from genkit.metrics import kmer_correlation  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("drakes", "sepo"), required=True)
    p.add_argument("--weights", type=float, nargs="+", required=True, help="KL weights (DRAKES alpha / SEPO kl)")
    p.add_argument("--every", type=int, default=20, help="fine-tuning steps between evaluations")
    p.add_argument("--pilot-n", type=int, default=128, help="samples per evaluation")
    p.add_argument("--kmer3-floor", type=float, default=0.85, help="the final 3-mer correlation a pick keeps")
    p.add_argument("--out", default=None)
    pa, rest = p.parse_known_args(argv)
    args = bd.parse_args(rest)  # bench_discrete's settings, its defaults unless given
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = dna(args.train_n, generator=bd.gen(args.seed))
    ref, _ = held_out("dna", args.n_ref)
    ft = bd.oracles(args)["finetune"]
    pre, _ = bd.pretrain(data, args)
    s = args.sample_steps

    def watch(model: torch.nn.Module, step: int, curve: list[dict[str, Any]], logs: dict[str, Any]) -> None:
        was = model.training
        with torch.no_grad():
            x = model.eval().sample(pa.pilot_n, steps=s, generator=bd.gen(args.seed + 40))
            curve.append({"step": step, "finetune_oracle_median": float(ft(x).median()),
                          "kmer3_corr": float(kmer_correlation(x, ref, k=3)),
                          **{f"train_{k}": v for k, v in logs.items()}})
        model.train(was)
        print(f"  step {step}: finetune median {curve[-1]['finetune_oracle_median']:.3f}, "
              f"3-mer {curve[-1]['kmer3_corr']:.3f}, training {logs}", flush=True)

    runs: dict[str, Any] = {}
    for w in pa.weights:
        torch.manual_seed(args.seed)
        if pa.method == "drakes":
            obj = DRAKES(copy.deepcopy(pre).requires_grad_(True).train(), pre,
                         Reward(ft, differentiable=True, name="finetune_oracle"), steps=s, truncate=args.truncate,
                         tau=args.tau, alpha=w, batch_size=args.drakes_batch)
            lr, batch = args.finetune_lr, args.drakes_batch
        else:
            obj = SEPO(copy.deepcopy(pre).requires_grad_(True).train(), Reward(ft, name="finetune_oracle"),
                       group=args.group, inner=args.inner, steps=s, batch_size=args.sepo_batch, kl=w,
                       reference=pre if w > 0 else None)
            lr, batch = args.sepo_lr, args.sepo_batch * args.group
        curve: list[dict[str, Any]] = []
        print(f"{pa.method} weight {w:g}", flush=True)
        watch(obj.model, 0, curve, {})

        def log(_trainer: Any, rec: Any, obj: Any = obj, curve: list[dict[str, Any]] = curve) -> None:
            watch(obj.model, rec.step, curve, {"loss": rec.loss, **rec.logs})

        bd.fit(obj, None, args.finetune_steps, lr, batch, args.seed, 1.0, log_every=pa.every, callbacks=[log])
        runs[f"{w:g}"] = {"weight": w, "lr": lr, "curve": curve,
                          "kmer3_ok": curve[-1]["kmer3_corr"] >= pa.kmer3_floor,
                          "kmer3_min": min(c["kmer3_corr"] for c in curve)}
    eligible = [r for r in runs.values() if r["kmer3_ok"]]
    pick = max(eligible, key=lambda r: r["curve"][-1]["finetune_oracle_median"])["weight"] if eligible else None
    wall = time.perf_counter() - t0
    res = {"settings": {**vars(args), **vars(pa)}, "runs": runs, "pick": pick, "wall_s": wall}
    command = " ".join(["python eval/pilot_discrete.py", *(sys.argv[1:] if argv is None else argv)])
    rows = [[f"{r['weight']:g}"] + [f"{c['finetune_oracle_median']:.2f} / {c['kmer3_corr']:.3f}" for c in r["curve"]]
            + [f"{r['kmer3_min']:.3f}", "yes" if r["kmer3_ok"] else "no"] for r in runs.values()]
    steps = [c["step"] for c in next(iter(runs.values()))["curve"]]
    md = (f"Pilot for bench_discrete's {pa.method.upper()} row: fine-tuning-oracle median / 3-mer correlation of "
          f"{pa.pilot_n} samples (S = {s}) over fine-tuning (lr {lr:g}, {args.finetune_steps} steps; never the "
          f"evaluation oracle). Command: `{command}`. Whole run {wall / 60:.1f} min.\n\n"
          + markdown_table(["weight", *(f"step {k}" for k in steps), "lowest 3-mer",
                            f"final 3-mer >= {pa.kmer3_floor:g}"], rows)
          + f"\n\nPick (the largest final fine-tuning-oracle median whose final 3-mer correlation is >= "
          f"{pa.kmer3_floor:g}): "
          f"**{pick}**.\n")
    out = Path(pa.out) if pa.out else RESULTS
    write_results(f"pilot_discrete_{pa.method}", res, md, out)
    print(md)


if __name__ == "__main__":
    main()
