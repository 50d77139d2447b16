"""Issue 8's check of searched solvers as a new user runs them: ``search_solver(field, 5, shape=(16,))``.

Field: the 16-D mixture of six well-separated narrow modes of ``bench_solvers.mixture(16, ..., narrow=True)``
(means N(0, I), std 0.05), on the linear path read as velocity (flow matching) and on the ddpm path read as eps
(diffusers' default DDPM configuration). Scored on --n unseen noise
samples (seed 123) against a 1000-step UniPC reference on the log-SNR grid, by the RMS of the per-sample L2
error (``bench_solvers.rms``). Contenders at 10 NFE: diffusers' DDIM, Euler, DPM-Solver++(2M) and UniPC
schedulers (through ``genkit.interop.DiffusersScheduler``) and genkit's classics on uniform and log-SNR
grids; at 5 NFE: ``search_solver`` with its default settings (the paper's search space) and the extended
search (``eval_times``, ``step_scales``, ``teleport="reference"``) with the same defaults, each from --seeds
search seeds (the median is the result, the worst is shown). The error is dominated by the ~1% of samples that
end between modes, so --n is large.

  python eval/bench_search_defaults.py     # ~10 min on 1 CPU thread -> results/bench_search_defaults.*
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_results  # noqa: E402
from bench_solvers import DIFFUSERS, diffusers_scheduler, mixture, rms  # noqa: E402

from genkit import DiffusersScheduler  # noqa: E402
from genkit.solvers import LogSNR, solve  # noqa: E402
from genkit.solvers.searched import search_solver  # noqa: E402

FIELDS = (("linear", "velocity"), ("ddpm", "eps"))  # flow matching; diffusers' DDPM configuration


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="unseen noise samples to score on")
    p.add_argument("--seeds", type=int, default=3, help="search seeds per field (medians are reported)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, targets, sections, payload_fields = time.perf_counter(), [], [], {}
    for path_name, prediction in FIELDS:
        field = mixture(16, path_name, prediction, narrow=True)
        x = field.path.sample_prior((args.n, 16), generator=torch.Generator().manual_seed(123), dtype=torch.float64)
        grid = LogSNR(t_min=0.0)
        rows = []
        with torch.no_grad():
            ref = solve(field, x, "unipc", 1000, grid).samples
            for name in DIFFUSERS:
                rows.append((f"diffusers {name}", 10, rms(solve(field, x, DiffusersScheduler(
                    diffusers_scheduler(name)), 10).samples, ref), None))
            for name in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"):
                for g in ("uniform", grid):
                    rows.append((f"genkit {name} ({'uniform' if g == 'uniform' else 'log-SNR'})", 10,
                                 rms(solve(field, x, name, 10, g).samples, ref), None))
        per_seed = {}
        for label, kw in (("search_solver defaults (DSS)", {}),
                          ("search_solver defaults, extended", dict(eval_times=True, step_scales=True,
                                                                    teleport="reference"))):
            runs = []
            for seed in range(args.seeds):
                t1 = time.perf_counter()
                s = search_solver(field, 5, shape=(16,), generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.float64, **kw)
                with torch.no_grad():
                    err = rms(solve(field, x, s, 5).samples, ref)
                runs.append({"seed": seed, "error": err, "seconds": time.perf_counter() - t1,
                             "holdout_loss": s.info["holdout_loss"], "dss_holdout_loss": s.info["dss_holdout_loss"],
                             "chosen": s.info["chosen"], "times": s.times.tolist()})
            per_seed[label] = runs
            errors = sorted(r["error"] for r in runs)
            rows.append((label, 5, statistics.median(errors), {
                "runs": runs, "worst": errors[-1], "seconds": statistics.median(r["seconds"] for r in runs),
                "chosen": [r["chosen"] for r in runs]}))
        best = min((r for r in rows if r[1] == 10 and r[0].startswith("diffusers")), key=lambda r: r[2])
        where = f"{path_name}/{prediction}"
        for r in rows:
            if r[1] == 5:
                targets.append({"target": f"{where}: {r[0]} @ 5 NFE (median of {args.seeds} seeds) <= best "
                                f"diffusers @ 10 NFE", "value": f"{r[2]:.3g} (worst {r[3]['worst']:.3g}) vs "
                                f"{best[2]:.3g} ({best[0]})", "pass": bool(r[2] <= best[2])})
        dss, ext = per_seed["search_solver defaults (DSS)"], per_seed["search_solver defaults, extended"]
        wins = sum(e["error"] <= d["error"] for d, e in zip(dss, ext))
        targets.append({"target": f"{where}: extended <= DSS on the unseen samples, same seed",
                        "value": f"{wins} of {args.seeds} seeds", "pass": wins == args.seeds})
        table = [[name, nfe, err, "" if extra is None else
                  f"worst of {args.seeds} seeds {extra['worst']:.4g}; median {extra['seconds']:.0f} s; kept "
                  f"{', '.join(extra['chosen'])}"] for name, nfe, err, extra in sorted(rows, key=lambda r: r[2])]
        sections += [f"## {field!r}", "", f"RMS error to the reference on {args.n} unseen samples (searched: median "
                     f"over search seeds 0..{args.seeds - 1}).", "",
                     markdown_table(["solver", "NFE", "error", "search"], table), ""]
        payload_fields[where] = [{"solver": r[0], "nfe": r[1], "error": r[2], "search": r[3]} for r in rows]
    md = "\n".join(["## Targets", "", markdown_table(["target", "measured", "result"], [
        [t["target"], t["value"], "PASS" if t["pass"] else "FAIL"] for t in targets]), "", *sections])
    payload = {"settings": vars(args), "targets": targets, "seconds": time.perf_counter() - t0,
               "fields": payload_fields}
    json_path, md_path = write_results("bench_search_defaults", payload, md + f"\n\nTotal {payload['seconds']:.0f} s.")
    for t in targets:
        print(("PASS" if t["pass"] else "FAIL"), t["target"], t["value"])
    print(json_path, md_path, sep="\n")


if __name__ == "__main__":
    main()
