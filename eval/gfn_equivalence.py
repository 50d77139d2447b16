"""genkit's GFlowNet losses against torchgfn's on the same weights and the same trajectories (issue 14).

bench_gflownet.py compares the two libraries' final L1 after training, where the seed-to-seed spread of one run is
several times the difference of two medians. This check takes the noise out: torchgfn builds its hypergrid
policy (``MLP`` 2 x 256, K-hot input, uniform P_B) and samples a batch of trajectories; genkit's ``GFlowNet`` gets
a copy of those weights (and of log Z or the flow head) and scores the very same trajectories. The two losses and
their parameter gradients should then agree to float32 rounding: if they do, the like-for-like training loops
differ only by their random streams (genkit's rollouts draw from their own generator), and an L1 gap between the
medians is read against the seed spread, not as a difference of method.

torchgfn's DB reads log F(s_0) from its flow head, so genkit's DB runs with ``s0_flow="head"`` here (its default
is the learned log Z scalar; bench_gflownet.py's DB rows use that default on genkit's side).

    python eval/gfn_equivalence.py        # ~20 s -> results/gfn_equivalence.{json,md}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, markdown_table, write_results  # noqa: E402

from genkit.models.gflownet import GFlowNet, HyperGrid  # noqa: E402
from genkit.models.gflownet.trajectories import Trajectories  # noqa: E402

R = {"r0": 0.1, "r1": 0.5, "r2": 2.0}
CONFIGS = {"2d_h8": (2, 8), "2d_h16": (2, 16), "4d_h8": (4, 8)}


def _copy_mlp(dst: torch.nn.Sequential, src: torch.nn.Module) -> None:
    """torchgfn's ``MLP`` (``trunk`` + ``last_layer``) into genkit's head, layer by layer."""
    theirs = [m for m in src.trunk if isinstance(m, torch.nn.Linear)] + [src.last_layer]
    ours = [m for m in dst if isinstance(m, torch.nn.Linear)]
    if [tuple(m.weight.shape) for m in ours] != [tuple(m.weight.shape) for m in theirs]:
        raise RuntimeError("the two policies' layers differ in shape; the check needs the same architecture")
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)


def _trajectories(tr: Any, env: HyperGrid, ndim: int) -> Trajectories:
    """torchgfn's sampled trajectories in genkit's layout: states padded with the terminal state (torchgfn pads
    with its sink), dummy actions -1 after the exit action (index ``ndim`` on both sides)."""
    states = tr.states.tensor.long()  # [T + 1, n, ndim]
    actions = tr.actions.tensor[..., 0].long()  # [T, n]
    lengths = (tr.terminating_idx if hasattr(tr, "terminating_idx") else tr.when_is_done).long()
    steps, n = actions.shape
    acts = torch.where(torch.arange(steps)[:, None] < lengths[None], actions, torch.full_like(actions, -1))
    terminal = states[lengths - 1, torch.arange(n)]
    padded = states.clone()
    for t in range(steps + 1):
        pad = t >= lengths
        padded[t, pad] = terminal[pad]
    return Trajectories(padded, acts, lengths, env.log_reward(terminal).float())


def check(ndim: int, height: int, loss: str, seed: int, batch: int) -> dict[str, Any]:
    from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
    from gfn.gflownet import DBGFlowNet, TBGFlowNet
    from gfn.gym import HyperGrid as TorchgfnHyperGrid
    from gfn.preprocessors import KHotPreprocessor
    from gfn.utils.common import set_seed
    from gfn.utils.modules import MLP, DiscreteUniform

    set_seed(seed)
    env = TorchgfnHyperGrid(ndim, height, reward_fn_str="original",
                            reward_fn_kwargs={"R0": R["r0"], "R1": R["r1"], "R2": R["r2"]})
    pre = KHotPreprocessor(height=height, ndim=ndim)
    pf_net = MLP(pre.output_dim, ndim + 1, 256, 2)
    pf = DiscretePolicyEstimator(pf_net, ndim + 1, preprocessor=pre)
    pb = DiscretePolicyEstimator(DiscreteUniform(ndim), ndim + 1, is_backward=True, preprocessor=pre)
    log_z0 = 0.3  # not 0: a log Z gradient that does not depend on it would go unnoticed
    if loss == "tb":
        theirs = TBGFlowNet(pf=pf, pb=pb, init_logZ=log_z0)
    else:
        flow_net = MLP(pre.output_dim, 1, 256, 2)
        theirs = DBGFlowNet(pf=pf, pb=pb, logF=ScalarEstimator(flow_net, preprocessor=pre))
    tr = theirs.sample_trajectories(env, n=batch, save_logprobs=True)
    loss_theirs = theirs.loss(env, theirs.to_training_samples(tr), recalculate_all_logprobs=False)
    theirs.zero_grad()
    loss_theirs.backward()

    ours = GFlowNet(HyperGrid(ndim, height, **R), loss=loss, hidden=256, depth=2, backward="uniform",
                    s0_flow="head" if loss == "db" else "log_z")
    _copy_mlp(ours.policy.heads["pf"], pf_net)
    if loss == "tb":
        with torch.no_grad():
            ours.policy.log_z.fill_(log_z0)
    else:
        _copy_mlp(ours.policy.heads["log_flow"], flow_net)
    loss_ours = ours.objective(_trajectories(tr, ours.env, ndim))
    ours.zero_grad()
    loss_ours.backward()

    def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))

    grads_theirs = [p.grad for p in [*pf_net.trunk.parameters(), *pf_net.last_layer.parameters()]]
    grads_ours = [p.grad for p in ours.policy.heads["pf"].parameters()]
    row = {"config": f"{ndim}d_h{height}", "loss": loss.upper(), "seed": seed, "batch": batch,
           "loss_torchgfn": loss_theirs.item(), "loss_genkit": loss_ours.item(),
           "loss_rel_diff": abs(loss_ours.item() - loss_theirs.item()) / abs(loss_theirs.item()),
           "pf_grad_max_rel_diff": rel(grads_ours, grads_theirs),
           "mean_length": float(_trajectories(tr, ours.env, ndim).lengths.float().mean())}
    if loss == "tb":
        row["log_z_grad_rel_diff"] = abs(float(ours.policy.log_z.grad) - float(theirs.logZ.grad)) / abs(
            float(theirs.logZ.grad))
    else:
        row["flow_grad_max_rel_diff"] = rel([p.grad for p in ours.policy.heads["log_flow"].parameters()],
                                            [p.grad for p in [*flow_net.trunk.parameters(),
                                                              *flow_net.last_layer.parameters()]])
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [check(ndim, height, loss, seed, args.batch_size) for ndim, height in CONFIGS.values()
            for loss in ("tb", "db") for seed in range(args.seeds)]
    worst = max(max(r["loss_rel_diff"], r["pf_grad_max_rel_diff"], r.get("log_z_grad_rel_diff", 0.0),
                    r.get("flow_grad_max_rel_diff", 0.0)) for r in rows)
    import gfn

    payload = {"settings": vars(args) | {"out": str(args.out)}, "torchgfn": getattr(gfn, "__version__", "?"),
               "rows": rows, "worst_rel_diff": worst}
    table = markdown_table(
        ["config", "loss", "seed", "loss torchgfn", "loss genkit", "loss rel diff", "P_F grad max rel diff",
         "log Z / log F grad rel diff", "mean length"],
        [[r["config"], r["loss"], r["seed"], f"{r['loss_torchgfn']:.6f}", f"{r['loss_genkit']:.6f}",
          f"{r['loss_rel_diff']:.1e}", f"{r['pf_grad_max_rel_diff']:.1e}",
          f"{r.get('log_z_grad_rel_diff', r.get('flow_grad_max_rel_diff')):.1e}", f"{r['mean_length']:.1f}"]
         for r in rows])
    md = "\n".join([
        f"Same weights, same trajectories (torchgfn {payload['torchgfn']} samples {args.batch_size} per row, "
        "uniform P_B, P_F MLP 2 x 256 on K-hot input; genkit copies its weights, log Z = 0.3 for TB, the flow "
        "head for DB with `s0_flow=\"head\"`): the loss and its parameter gradients on both sides, float32.", "",
        table, "",
        f"Largest relative difference: **{worst:.1e}** (float32 rounding is ~1e-7 per op). With equal losses and "
        "gradients on equal inputs, the two libraries' like-for-like training loops (bench_gflownet.py) differ only "
        "by their random streams, so the final L1 of one seed is compared against the other library's seed spread.",
    ])
    json_path, md_path = write_results("gfn_equivalence", payload, md + "\n", args.out)
    print(md)
    print("wrote", json_path, md_path)


if __name__ == "__main__":
    main()
