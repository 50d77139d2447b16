"""samplers/compare.py end to end at tiny size: a real run on a tiny flow-matching checkpoint, --help, and
bad input (one `error:` line, exit 2)."""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import genkit
from genkit.nets import MLP

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "samplers" / "compare.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = genkit.FlowMatching(MLP(2, hidden=16), path="linear", sample_shape=(2,))
    return genkit.save(tmp_path_factory.mktemp("ckpt") / "checkpoint", model)


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the script's ``__main__`` in this process (no interpreter start) and return (code, out, err)."""
    monkeypatch.setattr(sys, "argv", [str(COMPARE), *args])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(COMPARE), run_name="__main__")
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "cmp"
    args = ["--checkpoint", checkpoint, "--solvers", "euler,heun,rk4,dpmpp_2m", "--nfe", "4,8,16", "--grid", "uniform",
            "--n", 32, "--reference-steps", 64, "--out", out]
    proc = subprocess.run([sys.executable, str(COMPARE), *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "compare.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"compare.json", "compare.md", "compare.png"}
    res = report["results"]
    assert set(res) == {"euler", "heun", "rk4", "dpmpp_2m"}
    assert all(math.isfinite(r["error"]) for rows in res.values() for r in rows)
    assert [r["nfe"] for r in res["heun"]] == [4, 8, 16] and [r["steps"] for r in res["heun"]] == [2, 4, 8]
    assert [r["nfe"] for r in res["rk4"]] == [4, 8, 16] and [r["steps"] for r in res["rk4"]] == [1, 2, 4]
    # second and fourth order on a smooth (untrained) field and a uniform grid: the error falls with the budget
    for name in ("heun", "rk4"):
        errs = [r["error"] for r in res[name]]
        assert all(b < a for a, b in zip(errs, errs[1:])), (name, errs)
    assert report["reference"]["half_steps_error"] < min(r["error"] for r in res["heun"])
    assert "| heun |" in (out / "compare.md").read_text()
    # the error is genkit.metrics.endpoint_rms (per-sample L2 RMS), recomputed here, and named in the table
    from genkit.metrics import ENDPOINT_ERROR, endpoint_rms

    model = genkit.load(checkpoint)
    x = model.path.sample_prior((32, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = genkit.solve(model, x, "rk4", 64, "uniform").samples
        euler = [endpoint_rms(genkit.solve(model, x, "euler", n, "uniform").samples, ref) for n in (4, 8, 16)]
    assert [r["error"] for r in res["euler"]] == pytest.approx(euler, rel=1e-9)
    assert report["error"] == ENDPOINT_ERROR and f"| solver ({ENDPOINT_ERROR}) |" in (out / "compare.md").read_text()


def test_budget_that_does_not_fit_is_skipped(checkpoint, tmp_path, monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, "--checkpoint", str(checkpoint), "--solvers", "rk4,euler",
                         "--nfe", "3,4", "--n", "8", "--reference-steps", "8", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["skipped"] == [{"solver": "rk4", "nfe": 3}]
    assert [r["nfe"] for r in report["results"]["euler"]] == [3, 4]


def test_help(monkeypatch, capsys):
    code, out, _ = _main(monkeypatch, capsys, "--help")
    assert code == 0
    assert "--reference-steps" in out and "NFE" in out and "examples:" in out


@pytest.mark.parametrize("flags,needle", [
    (["--solvers", "euler,nope"], "nope"),
    (["--solvers", "ancestral"], "stochastic"),
    (["--nfe", "4,x"], "--nfe"),
    (["--grid", "wiggly"], "wiggly"),
])
def test_bad_input_exits_2_with_one_error_line(checkpoint, tmp_path, monkeypatch, capsys, flags, needle):
    code, _, err = _main(monkeypatch, capsys, "--checkpoint", str(checkpoint), "--out", str(tmp_path), *flags)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def test_steps_for_uses_the_declared_evaluations():
    """Budgets come from each solver's own NFE declaration, checked against what a solve measures: every
    registered fixed-step solver, a searched solver (only its own N fits) and EDM's Heun (one evaluation on the
    last step to sigma = 0), without special cases in the script."""
    from genkit.analytic import Gaussian
    from genkit.paths import get_path
    from genkit.solvers import SOLVERS, EDMStochastic, Karras, SearchedSolver, get_grid, get_solver, solve

    steps_for = runpy.run_path(str(COMPARE))["steps_for"]
    field = Gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), get_path("ddpm"), "eps")
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = get_grid("uniform")
    for name in SOLVERS.names():
        solver = get_solver(name)
        if not solver.fixed_step:
            assert steps_for(solver, 8, grid, field.path) is None  # adaptive: no budget can be promised
            continue
        for nfe in (3, 4, 8):
            steps = steps_for(solver, nfe, grid, field.path)
            per = solver.evals_per_step
            assert steps == (nfe // per if nfe % per == 0 else None), (name, nfe, steps)
            if steps is not None:
                sol = solve(field, x, solver, steps, grid, generator=torch.Generator().manual_seed(0))
                assert sol.nfe == nfe, (name, nfe)
    searched = SearchedSolver(torch.zeros(3), torch.zeros(3, 3), get_path("linear"))
    assert steps_for(searched, 3) == 3 and steps_for(searched, 4) is None
    lin = Gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), get_path("linear"))
    edm = EDMStochastic(churn=0.0)
    # both end at t = 0 (the last Heun step is an Euler step); the first starts at alpha = 0 (a DDIM step first)
    for grid, nfe in ((get_grid("karras"), 4), (Karras(t_max=0.95), 5)):
        assert steps_for(edm, nfe, grid, lin.path) == 3
        assert solve(lin, x, edm, 3, grid).nfe == nfe
