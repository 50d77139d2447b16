"""GPU check (CUDA): bf16 training of a digits ``Diffusion`` model with ``genkit.nets.UNet`` through genkit's
``Trainer``, an exact-resume check on the device, and 10-step sampling on CUDA, with timings.

What it runs:

1. ``Trainer(Diffusion(UNet(8), "cosine", "eps", sample_shape=(1, 8, 8)), TrainConfig(mixed_precision="bf16"))``
   on the digits train split (on the GPU), ``--windows`` timed windows of ``--window`` steps after one warm-up
   window; time per step is the median over windows (from the trainer's own throughput log, which excludes the
   final checkpoint write). Checks: finite losses, parameters and EMA stay float32, fused AdamW in use.
2. Resume on the device: the same run cut after its first checkpoint and resumed from it must end on the
   uninterrupted run's parameters and EMA (reported as the max abs difference; bit-exact unless a CUDA
   kernel is non-deterministic).
3. ``model.sample(64, steps=10)`` with the Euler and Heun solvers on CUDA: median of ``--repeats`` timed runs
   (``torch.cuda.synchronize`` around each), and finite samples.
4. A 5-iteration ``search_solver`` with every genkit extension (teleport jump fitted to the reference, searched
   evaluation times and step scales) on the device; the solver must give finite samples there and the same
   samples after a save and load.
5. Normalizing flows on the device (``--checks flows``): a coupling NSF (8-D, 4 spline layers) trained by maximum
   likelihood under bf16 autocast (median ms/step over ``--windows`` windows), whose spline arithmetic must stay
   float32 (log-densities float32 and finite; the round trip x -> z -> x under autocast within 1e-4); sampling
   1024 points (median of ``--repeats``); and a stochastic normalizing flow (flow layers with Langevin and
   Metropolis blocks) on the double well: finite importance weights and their effective sample size.

6. One-step models on the device (``--checks onestep``): the digits UNet of part 1 trained through the ``Trainer``
   under bf16 autocast as flow matching, as MeanFlow (its JVP target in float32 with the math attention kernel)
   and as SMD distilling the flow-matching model (two alternating optimizers): median ms/step over ``--windows``
   windows and the peak memory of each, reported as ratios to flow matching (issue target: MeanFlow <= 2x); the
   MeanFlow JVP under autocast must come back float32, every loss finite and the parameters float32; one-step
   sampling of both on the device.

7. Masked discrete diffusion on the device (``--checks discrete``): an ``mdlm`` model with the DRAKES-style
   ``ConvDNA`` backbone (64 channels, 8 blocks) on the DNA-like task (length 100) trained through the ``Trainer``
   under bf16 autocast (median ms/step; finite losses, float32 parameters), ancestral sampling on the device,
   DRAKES fine-tuning (the exact differentiable activity as reward, 32 reverse steps, the last 8 differentiable,
   ``min(16, --batch-size)`` rollouts) for a few steps through the ``Trainer`` (median ms/step, finite losses and
   rewards, float32 parameters), and
   SVDD sampling on the device.

8. Reward fine-tuning of a continuous model on the device (``--checks finetune``): VARD (with a UNet value
   network), DRaFT and DDPO on a digits ``Diffusion(UNet(8))`` through the ``Trainer`` (ancestral steps, a
   differentiable brightness reward): median ms/step, finite losses, float32 parameters, samples on the device.

9. GFlowNets on the device (``--checks gflownet``): TB on hypergrid 2-D h=8 and SubTB with a learned backward
   policy on 4-D h=8 through the ``Trainer`` (at least 300 steps of 16 trajectories), plus a replayed, exploring
   DB run: median ms/step, finite losses, the exact L1 of the trained policy (dynamic programming on the device's
   policy) below 0.7 of the untrained one, candidates sampled on the device.

``--checks diffusion,flows,onestep,discrete,finetune,gflownet`` (the default) picks the parts; 1-4 are
``diffusion``.

Prints a summary and writes ``eval/results/gpu_check.json``. Exit status: 0 when every check passes, 1 when
one fails, 77 (the usual "skipped") when there is no CUDA device. ``--allow-cpu`` runs the same steps on the
CPU to test this script itself (timings meaningless; writes ``gpu_check_cpu_dryrun.json``).

Usage: ``python eval/gpu_check.py [--window 20 --windows 5 --batch-size 128 --repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, machine_info, median  # noqa: E402

SKIPPED = 77


class _Interrupt(Exception):
    pass


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # accelerate keeps per-process singletons
    GradientState._reset_state()


def _model(seed: int) -> Any:
    from genkit.models import Diffusion
    from genkit.nets import UNet

    torch.manual_seed(seed)
    return Diffusion(UNet(8), "cosine", "eps", sample_shape=(1, 8, 8))


def _config(out: str, steps: int, args: argparse.Namespace, **changes: Any) -> Any:
    from genkit.train import TrainConfig

    base = dict(steps=steps, batch_size=args.batch_size, lr=2e-4, warmup_steps=min(10, steps), seed=args.seed,
                mixed_precision="bf16", log_every=args.window, checkpoint_every=None, out_dir=out,
                progress=False, cpu=args.allow_cpu and not torch.cuda.is_available())
    return TrainConfig(**{**base, **changes})


def train_timing(data: torch.Tensor, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from genkit.train import Trainer

    _reset_accelerate()
    model = _model(args.seed)
    steps = args.window * (args.windows + 1)
    records: list = []
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, _config(out, steps, args), callbacks=[lambda t, r: records.append(r)])
        start = time.perf_counter()
        result = trainer.fit(data)
        wall = time.perf_counter() - start
    window_ms = [1e3 * args.batch_size / r.samples_per_s for r in records[1:]]  # ms per step in each window
    params = [p for p in model.parameters()]
    return {
        "device": str(trainer.accelerator.device), "steps": steps, "batch_size": args.batch_size,
        "ms_per_step_median": median(window_ms), "ms_per_step_windows": window_ms,
        "wall_s_including_setup_and_final_checkpoint": wall,
        "losses": [loss for _, loss in result.losses],
        "checks": {
            "losses_finite": all(math.isfinite(loss) for _, loss in result.losses),
            "params_fp32": all(p.dtype == torch.float32 for p in params),
            "params_finite": all(bool(torch.isfinite(p).all()) for p in params),
            "ema_fp32": all(v.dtype == torch.float32 for v in result.ema.values() if v.is_floating_point()),
            "fused_adamw": bool(trainer._fused),
            "autocast_bf16": trainer.accelerator.mixed_precision == "bf16",
        },
        "max_memory_allocated_mb": (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
    }, model


def resume_check(data: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from genkit.train import Trainer

    steps, cut = 2 * args.window, args.window
    with tempfile.TemporaryDirectory() as root:
        _reset_accelerate()
        full_model = _model(args.seed)
        full = Trainer(full_model, _config(f"{root}/full", steps, args)).fit(data)

        def stop(trainer: Any, record: Any) -> None:
            if record.step == cut:
                raise _Interrupt  # after the checkpoint of step `cut`, like a preempted job

        _reset_accelerate()
        try:
            Trainer(_model(args.seed), _config(f"{root}/cut", steps, args, checkpoint_every=cut),
                    callbacks=[stop]).fit(data)
        except _Interrupt:
            pass
        _reset_accelerate()
        resumed_model = _model(args.seed + 1)  # different init: everything must come from the checkpoint
        resumed = Trainer(resumed_model, _config(f"{root}/cut", steps, args, checkpoint_every=cut)).fit(data)
    param_diff = max(float((a.detach() - b.detach()).abs().max())
                     for a, b in zip(full_model.parameters(), resumed_model.parameters()))
    ema_diff = max(float((full.ema[k].float() - resumed.ema[k].float()).abs().max()) for k in full.ema)
    return {"steps": steps, "cut_at": cut, "max_abs_param_diff": param_diff, "max_abs_ema_diff": ema_diff,
            "bit_exact": param_diff == 0.0 and ema_diff == 0.0,
            "final_loss_full": full.losses[-1][1], "final_loss_resumed": resumed.losses[-1][1]}


def sample_timing(model: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {}
    for solver in ("euler", "heun"):
        times, finite = [], True
        for r in range(args.repeats + 1):  # the first run warms up and is not counted
            gen = torch.Generator(device=device).manual_seed(args.seed + r)
            sync()
            start = time.perf_counter()
            x = model.sample(args.sample_n, solver=solver, steps=10, generator=gen, device=device)
            sync()
            if r:
                times.append(1e3 * (time.perf_counter() - start))
            finite = finite and bool(torch.isfinite(x).all())
        out[solver] = {"n": args.sample_n, "steps": 10, "ms_median": median(times), "ms_repeats": times,
                       "shape": list(x.shape), "device": str(x.device), "finite": finite}
    return out


def searched_check(model: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """A short DSS search with every genkit extension (teleport jump fitted to the reference, evaluation-time
    shifts, step scales) on the device, saved, loaded and solved again there."""
    from genkit.solvers import solve
    from genkit.solvers.searched import load_searched_solver, search_solver

    model = model.to(device).eval()
    start = time.perf_counter()
    s = search_solver(model, 3, shape=tuple(model.sample_shape), variant="data", iters=5, batch=16, pool=32,
                      reference_steps=20, eval_times=True, step_scales=True, teleport="reference",
                      lr_schedule="cosine", grid=model.default_grid("uniform"),
                      generator=torch.Generator(device=device).manual_seed(args.seed),
                      device=device)
    seconds = time.perf_counter() - start
    x = model.path.sample_prior((8, *model.sample_shape), generator=torch.Generator(device=device).manual_seed(1),
                                device=device)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        grid = model.default_grid("uniform")
        out = solve(model, x, s, 3, grid).samples
        again = solve(model, x, load_searched_solver(s.save(Path(tmp) / "s")), 3, grid).samples
    return {"search_seconds": seconds, "device": str(out.device), "finite": bool(torch.isfinite(out).all()),
            "loaded_equal": bool(torch.equal(out, again)), "times": s.times.tolist()}


def flow_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 5: a coupling NSF trained under bf16 autocast on the device, its sampling time, and an SNF."""
    from genkit.energies import ENERGIES
    from genkit.metrics import effective_sample_size
    from genkit.models.flows import CouplingSpline, Flow, LangevinBlock, MetropolisBlock, Permutation, StochasticFlow

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    d = 8
    layers: list[Any] = []
    for i in range(4):
        layers += [CouplingSpline(d, bins=8, hidden=128, parity=i), Permutation.reverse(d)]
    flow = Flow(layers, features=d).to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    centres = 2.0 * torch.randn(4, d, generator=g, device=device)
    data = centres[torch.randint(4, (4096,), generator=g, device=device)] + 0.5 * torch.randn(
        4096, d, generator=g, device=device)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-3)
    windows: list[float] = []
    dtypes: set[str] = set()
    finite = True
    for w in range(args.windows + 1):  # the first window warms up
        sync()
        start = time.perf_counter()
        for _ in range(args.window):
            batch = data[torch.randint(4096, (args.batch_size,), generator=g, device=device)]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logp = flow.log_prob(batch)
            dtypes.add(str(logp.dtype))
            loss = -logp.mean()
            finite = finite and bool(torch.isfinite(loss))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        if w:
            windows.append(1e3 * (time.perf_counter() - start) / args.window)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        x = data[:512]
        z = x
        for t in flow.transforms:
            z, _ = t(z)
        back = z
        for t in reversed(flow.transforms):
            back, _ = t.inverse(back)
        round_trip = float((back - x).abs().max())
    times = []
    for r in range(args.repeats + 1):
        gen = torch.Generator(device=device).manual_seed(args.seed + r)
        sync()
        start = time.perf_counter()
        s = flow.sample(1024, generator=gen)
        sync()
        if r:
            times.append(1e3 * (time.perf_counter() - start))
    target = ENERGIES.get("double_well")()
    snf_layers: list[Any] = []
    for i, lam in enumerate((0.25, 0.5, 0.75, 1.0)):
        snf_layers += [CouplingSpline(2, bins=8, hidden=64, parity=i), Permutation.reverse(2),
                       LangevinBlock(target, lam, step_size=0.01, n_steps=2), MetropolisBlock(target, lam)]
    snf = StochasticFlow(snf_layers, features=2).to(device)
    xs, log_w = snf.sample_with_log_weights(1024, target, generator=torch.Generator(device=device).manual_seed(0))
    return {"features": d, "transforms": len(layers), "batch_size": args.batch_size,
            "ms_per_step_median": median(windows), "ms_per_step_windows": windows,
            "final_loss": float(loss.detach()), "finite": finite, "log_prob_dtypes": sorted(dtypes),
            "round_trip_max_abs_autocast": round_trip, "sample_1024_ms_median": median(times),
            "sample_device": str(s.device), "snf_device": str(xs.device),
            "snf_finite": bool(torch.isfinite(log_w).all()), "snf_ess_fraction": effective_sample_size(log_w) / 1024}


def onestep_check(data: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 6: flow matching, MeanFlow and SMD (from the flow-matching model) on the digits UNet under bf16."""
    from genkit.models import SMD, FlowMatching, MeanFlow
    from genkit.nets import UNet
    from genkit.train import Trainer

    steps = args.window * (args.windows + 1)
    out: dict[str, Any] = {"steps": steps, "batch_size": args.batch_size}
    finite, fp32 = {}, {}
    models: dict[str, Any] = {}
    for name in ("flow_matching", "meanflow", "smd"):
        _reset_accelerate()
        torch.manual_seed(args.seed)
        if name == "flow_matching":
            model = FlowMatching(UNet(8), sample_shape=(1, 8, 8))
        elif name == "meanflow":
            model = MeanFlow(UNet(8, **MeanFlow.net_options(args, "unet")), sample_shape=(1, 8, 8))  # time_scale 5
        else:
            model = SMD.from_teacher(models["flow_matching"], batch_size=args.batch_size)
        records: list = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as folder:
            trainer = Trainer(model, _config(folder, steps, args), callbacks=[lambda t, r, log=records: log.append(r)])
            result = trainer.fit(None if name == "smd" else data)
        window_ms = [1e3 * args.batch_size / r.samples_per_s for r in records[1:]]
        out[name] = {"ms_per_step_median": median(window_ms), "ms_per_step_windows": window_ms,
                     "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                     "losses": [loss for _, loss in result.losses]}
        finite[name] = all(math.isfinite(loss) for _, loss in result.losses)
        fp32[name] = all(p.dtype == torch.float32 for p in model.parameters())
        models[name] = model
    fm = out["flow_matching"]
    for name in ("meanflow", "smd"):
        out[name]["time_ratio_to_flow_matching"] = out[name]["ms_per_step_median"] / fm["ms_per_step_median"]
        if fm["peak_memory_mb"]:
            out[name]["memory_ratio_to_flow_matching"] = out[name]["peak_memory_mb"] / fm["peak_memory_mb"]
    mf = models["meanflow"]
    z = torch.randn(8, 1, 8, 8, device=device)
    t, r = torch.full((8,), 0.7, device=device), torch.full((8,), 0.2, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        u, dudt = mf.time_derivative(z, r, t, torch.randn_like(z))
    samples = {name: models[name].sample(64, generator=torch.Generator(device=device).manual_seed(0))
               for name in ("meanflow", "smd")}
    out["jvp_dtypes_under_autocast"] = [str(u.dtype), str(dudt.dtype)]
    out["checks"] = {
        **{f"onestep_{k}_losses_finite": v for k, v in finite.items()},
        **{f"onestep_{k}_params_fp32": v for k, v in fp32.items()},
        "meanflow_jvp_float32_under_bf16_autocast": out["jvp_dtypes_under_autocast"] == ["torch.float32"] * 2,
        "meanflow_time_per_step_within_2x_flow_matching": out["meanflow"]["time_ratio_to_flow_matching"] <= 2.0,
        **{f"{k}_one_step_samples_finite_on_device": bool(torch.isfinite(v).all()) and v.device.type == device.type
           for k, v in samples.items()}}
    return out


def discrete_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 7: masked diffusion (ConvDNA on the DNA-like task) under bf16, DRAKES fine-tuning and SVDD on the device."""
    import copy

    from genkit.data import dna_task
    from genkit.finetune import DRAKES, SVDDSampler
    from genkit.finetune.oracles import get_reward
    from genkit.models import MaskedDiffusion
    from genkit.nets import ConvDNA
    from genkit.train import Trainer

    steps = args.window * (args.windows + 1)
    _reset_accelerate()
    torch.manual_seed(args.seed)
    model = MaskedDiffusion(ConvDNA(4, 100, channels=64, depth=8), vocab_size=4, length=100)
    data = dna_task.dna(20 * args.batch_size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    records: list = []
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(model, _config(folder, steps, args, lr=1e-3),
                          callbacks=[lambda t, r, log=records: log.append(r)])
        result = trainer.fit(data)
    window_ms = [1e3 * args.batch_size / r.samples_per_s for r in records[1:]]
    out: dict[str, Any] = {"steps": steps, "batch_size": args.batch_size,
                           "mdlm": {"ms_per_step_median": median(window_ms), "ms_per_step_windows": window_ms,
                                    "losses": [loss for _, loss in result.losses]}}
    gen = torch.Generator(device=device).manual_seed(0)
    x = model.eval().sample(args.sample_n, steps=32, generator=gen)
    reward = get_reward("dna_activity")
    _reset_accelerate()
    rollouts = min(16, args.batch_size)
    obj = DRAKES(copy.deepcopy(model).requires_grad_(True).train(), model, reward, steps=32, truncate=8,
                 batch_size=rollouts)
    records = []
    ft_steps = 2 * max(1, args.window // 4)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(obj, _config(folder, ft_steps, args, lr=1e-4, ema_decay=None,
                                       log_every=max(1, ft_steps // 2)),
                          callbacks=[lambda t, r, log=records: log.append(r)])
        result = trainer.fit()
    out["drakes"] = {"steps": ft_steps,
                     "ms_per_step_median": median([1e3 * rollouts / r.samples_per_s for r in records]),
                     "losses": [loss for _, loss in result.losses],
                     "rewards": [float(r.logs["reward"]) for r in records]}
    guided = model.sample(args.sample_n, sampler=SVDDSampler(reward, candidates=4, steps=16),
                          generator=torch.Generator(device=device).manual_seed(0))
    out["svdd_activity_mean"] = float(dna_task.activity(guided.cpu()).mean())
    out["plain_activity_mean"] = float(dna_task.activity(x.cpu()).mean())
    out["checks"] = {
        "mdlm_losses_finite": all(math.isfinite(loss) for loss in out["mdlm"]["losses"]),
        "mdlm_params_fp32": all(p.dtype == torch.float32 for p in model.parameters()),
        "mdlm_samples_on_device": x.device.type == device.type and int(x.max()) < 4,
        "drakes_losses_finite": all(math.isfinite(v) for v in out["drakes"]["losses"] + out["drakes"]["rewards"]),
        "drakes_params_fp32": all(p.dtype == torch.float32 for p in obj.model.parameters()),
        "svdd_samples_on_device": guided.device.type == device.type and int(guided.max()) < 4}
    return out


def finetune_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 8: VARD, DRaFT and DDPO on a digits diffusion UNet through the Trainer, on the device."""
    import copy

    from genkit.finetune import DDPO, VARD, DRaFT, Reward, ValueNetwork
    from genkit.models import Diffusion
    from genkit.nets import UNet
    from genkit.train import Trainer

    torch.manual_seed(args.seed)
    pre = Diffusion(UNet(8), "cosine", "eps", sample_shape=(1, 8, 8)).to(device).eval()
    reward = Reward(lambda x: x.flatten(1).mean(-1), differentiable=True, name="brightness")
    batch, steps = min(16, args.batch_size), 2 * max(2, args.window // 4)
    out: dict[str, Any] = {"batch_size": batch, "steps": steps}
    checks: dict[str, bool] = {}
    for name in ("vard", "draft", "ddpo"):
        _reset_accelerate()
        model = copy.deepcopy(pre).requires_grad_(True).train()
        kw = {"steps": 10, "batch_size": batch}
        if name == "vard":
            value = ValueNetwork(UNet(8, block_out_channels=(16, 32)), features=64).to(device)
            obj = VARD(model, pre, reward, value, **kw)
        elif name == "draft":
            obj = DRaFT(model, pre, reward, truncate=2, **kw)
        else:
            obj = DDPO(model, pre, reward, **kw)
        records: list = []
        with tempfile.TemporaryDirectory() as folder:
            trainer = Trainer(obj, _config(folder, steps, args, lr=1e-4, ema_decay=None, mixed_precision="no",
                                           batch_size=batch, log_every=1),
                              callbacks=[lambda t, r, log=records: log.append(r)])
            result = trainer.fit()
        x = model.eval().sample(8, steps=10, generator=torch.Generator(device=device).manual_seed(0))
        out[name] = {"ms_per_step_median": median([1e3 * batch / r.samples_per_s for r in records[1:] or records]),
                     "losses": [loss for _, loss in result.losses]}
        checks[f"{name}_losses_finite"] = all(math.isfinite(v) for v in out[name]["losses"])
        checks[f"{name}_params_fp32"] = all(p.dtype == torch.float32 for p in model.parameters())
        checks[f"{name}_samples_finite_on_device"] = bool(torch.isfinite(x).all()) and x.device.type == device.type
    out["checks"] = checks
    return out


def gflownet_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 9: GFlowNets (rollouts, scoring, losses, replay, exact evaluation) through the Trainer, on the device."""
    from genkit.models.gflownet import GFlowNet, HyperGrid, l1, true_distribution
    from genkit.train import Trainer

    steps = max(300, 20 * args.window)
    runs = {"tb_2d_h8": ({"ndim": 2, "height": 8}, {"loss": "tb"}),
            "subtb_4d_h8_learned_pb": ({"ndim": 4, "height": 8}, {"loss": "subtb", "backward": "learned"}),
            "db_2d_h8_replay_explore": ({"ndim": 2, "height": 8}, {"loss": "db", "replay": 256, "epsilon": 0.1})}
    out: dict[str, Any] = {"steps": steps}
    checks: dict[str, bool] = {}
    for name, (grid, options) in runs.items():
        _reset_accelerate()
        env = HyperGrid(**grid)
        model = GFlowNet(env, batch_size=16, seed=args.seed, **options).to(device)
        target = true_distribution(env)
        before = l1(model.terminal_distribution(), target)
        records: list = []
        with tempfile.TemporaryDirectory() as folder:
            trainer = Trainer(model, _config(folder, steps, args, lr=1e-3, ema_decay=None, mixed_precision="no",
                                             batch_size=16, log_every=max(1, steps // 20)),
                              callbacks=[lambda t, r, log=records: log.append(r)])
            result = trainer.fit()
        after = l1(model.terminal_distribution(), target)
        x = model.sample(1024, generator=torch.Generator(device=device).manual_seed(0))
        out[name] = {"ms_per_step_median": median([1e3 * 16 / r.samples_per_s for r in records[1:] or records]),
                     "l1_exact_before": before, "l1_exact_after": after,
                     "losses": [loss for _, loss in result.losses]}
        checks[f"gflownet_{name}_losses_finite"] = all(math.isfinite(v) for v in out[name]["losses"])
        checks[f"gflownet_{name}_l1_improves"] = after < 0.7 * before
        checks[f"gflownet_{name}_samples_on_device"] = x.device.type == device.type and x.dtype == torch.long
    out["checks"] = checks
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=20, help="steps per timed window (and warm-up)")
    parser.add_argument("--windows", type=int, default=5, help="timed windows")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sample-n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling runs per solver")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checks", default="diffusion,flows,onestep,discrete,finetune,gflownet",
                        help="comma-separated parts: diffusion, flows, onestep, discrete, finetune, gflownet")
    parser.add_argument("--allow-cpu", action="store_true", help="test this script on a CPU (timings meaningless)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a machine with an NVIDIA GPU; "
              "nothing was checked. (--allow-cpu runs the same steps on the CPU to test the script.)")
        return SKIPPED
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from genkit.data import digits

    parts = {p.strip() for p in args.checks.split(",") if p.strip()}
    if not parts or parts - {"diffusion", "flows", "onestep", "discrete", "finetune", "gflownet"}:
        parser.error(f"--checks takes diffusion, flows, onestep, discrete, finetune and / or gflownet; got "
                     f"{args.checks!r}")
    record: dict[str, Any] = {"benchmark": "gpu_check",
                              "command": "python " + " ".join(["eval/gpu_check.py", *sys.argv[1:]]),
                              "machine": machine_info(), "settings": vars(args)}
    checks: dict[str, bool] = {}
    if "diffusion" in parts:
        data = digits("train").to(device)
        train, model = train_timing(data, args)
        resume = resume_check(data, args)
        sampling = sample_timing(model, args, device)
        searched = searched_check(model, args, device)
        checks.update({
            **train["checks"], "resume_completed": math.isfinite(resume["final_loss_resumed"]),
            "resume_max_abs_param_diff_below_1e-5": resume["max_abs_param_diff"] < 1e-5,
            **{f"sample_{k}_finite": v["finite"] for k, v in sampling.items()},
            **{f"sample_{k}_on_device": v["device"].startswith(device.type) for k, v in sampling.items()},
            "searched_extended_finite_on_device": searched["finite"] and searched["device"].startswith(device.type),
            "searched_extended_reloads_exactly": searched["loaded_equal"]})
        record.update({"train_bf16": train, "resume": resume, "sampling": sampling, "searched": searched})
    if "flows" in parts:
        flows = flow_check(args, device)
        checks.update({
            "flow_bf16_finite": flows["finite"], "flow_log_prob_float32": flows["log_prob_dtypes"] == ["torch.float32"],
            "flow_round_trip_autocast_below_1e-4": flows["round_trip_max_abs_autocast"] < 1e-4,
            "flow_sample_on_device": flows["sample_device"].startswith(device.type),
            "snf_finite_on_device": flows["snf_finite"] and flows["snf_device"].startswith(device.type)})
        record["flows"] = flows
    if "onestep" in parts:
        onestep = onestep_check(digits("train").to(device), args, device)
        checks.update(onestep.pop("checks"))
        record["onestep"] = onestep
    if "discrete" in parts:
        discrete = discrete_check(args, device)
        checks.update(discrete.pop("checks"))
        record["discrete"] = discrete
    if "finetune" in parts:
        finetune = finetune_check(args, device)
        checks.update(finetune.pop("checks"))
        record["finetune"] = finetune
    if "gflownet" in parts:
        gfn = gflownet_check(args, device)
        checks.update(gfn.pop("checks"))
        record["gflownet"] = gfn
    record.update({"checks": checks, "passed": all(checks.values())})
    name = "gpu_check" if device.type == "cuda" else "gpu_check_cpu_dryrun"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"device {record['machine'].get('gpu', device)}; torch {torch.__version__}")
    if "flows" in record:
        f = record["flows"]
        print(f"flow bf16: {f['ms_per_step_median']:.2f} ms/step; sample 1024: {f['sample_1024_ms_median']:.2f} ms; "
              f"SNF ESS {f['snf_ess_fraction']:.3f}; round trip {f['round_trip_max_abs_autocast']:.2g}")
    if "onestep" in record:
        o = record["onestep"]
        print(f"one-step bf16: flow matching {o['flow_matching']['ms_per_step_median']:.2f} ms/step; "
              + "; ".join(f"{k} {o[k]['ms_per_step_median']:.2f} ms/step ({o[k]['time_ratio_to_flow_matching']:.2f}x"
                          + (f", memory {o[k]['memory_ratio_to_flow_matching']:.2f}x" if "memory_ratio_to_flow_matching"
                             in o[k] else "") + ")" for k in ("meanflow", "smd")))
    if "discrete" in record:
        d = record["discrete"]
        print(f"masked diffusion bf16 (ConvDNA, L = 100): {d['mdlm']['ms_per_step_median']:.2f} ms/step; DRAKES "
              f"{d['drakes']['ms_per_step_median']:.2f} ms/step; SVDD activity {d['svdd_activity_mean']:.3f} vs plain "
              f"{d['plain_activity_mean']:.3f}")
    if "finetune" in record:
        print("reward fine-tuning (digits UNet, 10 ancestral steps): " + "; ".join(
            f"{k} {record['finetune'][k]['ms_per_step_median']:.1f} ms/step" for k in ("vard", "draft", "ddpo")))
    if "gflownet" in record:
        print("gflownet (hypergrid, Trainer): " + "; ".join(
            f"{k} {v['ms_per_step_median']:.2f} ms/step, exact L1 {v['l1_exact_before']:.3f} -> "
            f"{v['l1_exact_after']:.4f}" for k, v in record["gflownet"].items() if isinstance(v, dict)))
    if "diffusion" in parts:
        train, resume, sampling = record["train_bf16"], record["resume"], record["sampling"]
        print(f"train bf16: {train['ms_per_step_median']:.2f} ms/step (median of {len(train['ms_per_step_windows'])} "
              f"windows of {args.window} steps, batch {args.batch_size}); final loss {train['losses'][-1]:.4f}")
        print(f"resume: max |param diff| {resume['max_abs_param_diff']:.3g}, "
              f"max |EMA diff| {resume['max_abs_ema_diff']:.3g}")
        for solver, s in sampling.items():
            print(f"sample {solver}: {s['ms_median']:.2f} ms for {s['n']} samples x 10 steps "
                  f"(median of {args.repeats})")
    for key, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {key}")
    print(f"wrote {RESULTS / f'{name}.json'}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
