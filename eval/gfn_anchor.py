"""torchgfn anchor for the GFlowNet benchmark (issue 14).

Trains torchgfn's own GFlowNets (``TBGFlowNet``, ``DBGFlowNet``, ``SubTBGFlowNet``) on torchgfn's own
``HyperGrid`` with the set-up of torchgfn's ``tutorials/examples/train_hypergrid.py`` (KHot preprocessor,
``MLP`` policies, ``DiscreteUniform`` or learned PB, ``ScalarEstimator`` log F for DB / SubTB, AdamW with a
separate log Z group, on-policy sampling through ``gflownet.sample_trajectories`` -> ``gfn.samplers.Sampler``),
times each training iteration, and exposes the trained forward policy as a dense table so that its exact
terminal distribution can be computed by dynamic programming.

torchgfn is imported only inside this file (and only inside ``run_torchgfn``); it is a benchmark anchor,
not a genkit dependency. ``exact_terminal_distribution`` and ``true_distribution`` are small stand-alone
helpers so that the anchor can be scored on its own.

Layout conventions (identical in torchgfn, so no conversion is needed):
- state index ``sum_i x_i * height**(ndim-1-i)`` (x_0 most significant), as ``HyperGrid.get_states_indices``;
- action ``i < ndim`` is ``+1`` in dimension ``i`` (``HyperGrid.step`` scatters +1 at index ``action``),
  action ``ndim`` (the last) is exit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _grid_states(ndim: int, height: int) -> torch.Tensor:
    """All grid states [height**ndim, ndim] in row-major order (x_0 most significant)."""
    idx = torch.arange(height**ndim)
    base = height ** torch.arange(ndim - 1, -1, -1)
    return (idx[:, None] // base[None, :]) % height


def true_distribution(ndim: int, height: int, r0: float = 0.1, r1: float = 0.5, r2: float = 2.0) -> torch.Tensor:
    """Normalised hypergrid reward (R0 / R1 / R2, the GFlowNet paper's "original" reward), float64 [height**ndim].

    With ``a_i = |x_i / (height - 1) - 0.5|``: ``R = r0 + r1 * prod_i[0.25 < a_i] + r2 * prod_i[0.3 < a_i < 0.4]``
    (torchgfn adds a 1e-12 margin to each bound; no grid point lies that close to a bound).
    """
    a = (_grid_states(ndim, height).double() / (height - 1) - 0.5).abs()
    r = r0 + r1 * (a > 0.25).all(-1).double() + r2 * ((a > 0.3) & (a < 0.4)).all(-1).double()
    return r / r.sum()


def exact_terminal_distribution(log_pf_table: torch.Tensor, ndim: int, height: int) -> torch.Tensor:
    """Exact terminal distribution of a forward policy on the hypergrid, float64 [height**ndim].

    ``log_pf_table`` is [height**ndim, ndim + 1] (states row-major, actions "+1 in dim 0..ndim-1, then exit").
    Dynamic programming over the DAG by levels of coordinate sum: ``P(s') = sum_i P(s' - e_i) P_F(+e_i | s' - e_i)``
    with ``P(s0) = 1``, then ``P_T(x) = P(x) P_F(exit | x)``.
    """
    pf = log_pf_table.double().exp()
    n = height**ndim
    states = _grid_states(ndim, height).to(pf.device)
    strides = (height ** torch.arange(ndim - 1, -1, -1)).to(pf.device)
    level = states.sum(-1)
    reach = torch.zeros(n, dtype=torch.float64, device=pf.device)
    reach[0] = 1.0
    for k in range(1, ndim * (height - 1) + 1):
        cur = (level == k).nonzero().squeeze(-1)
        acc = torch.zeros(cur.numel(), dtype=torch.float64, device=pf.device)
        for i in range(ndim):
            ok = states[cur, i] > 0
            parent = cur[ok] - strides[i]
            acc[ok] += reach[parent] * pf[parent, i]
        reach[cur] = acc
    return reach * pf[:, ndim]


def run_torchgfn(
    *,
    ndim: int,
    height: int,
    loss: str,
    iterations: int,
    batch_size: int = 16,
    hidden: int = 256,
    n_hidden: int = 2,
    lr: float = 1e-3,
    lr_logz: float = 0.1,
    r0: float = 0.1,
    r1: float = 0.5,
    r2: float = 2.0,
    uniform_pb: bool = True,
    subtb_lambda: float = 0.9,
    seed: int = 0,
    device: str = "cpu",
    eval_every: int | None = None,
    on_eval: Callable[[int, int, torch.Tensor, float | None], None] | None = None,
    weight_decay: float = 0.0,
    tied: bool = False,
    subtb_weighting: str = "geometric_within",
    debug: bool = False,
) -> dict:
    """Train torchgfn on its HyperGrid as ``train_hypergrid.py`` does (on-policy, no replay buffer, no exploration).

    ``loss`` is "tb", "db" or "subtb". ``n_hidden`` counts hidden layers including the input projection
    (torchgfn's ``MLP(n_hidden_layers=...)``): 2 means input->256->256->output. ``weight_decay`` is the AdamW
    weight decay of the non-log-Z group (train_hypergrid.py's CLI default is 1e-4, its test_scripts.py uses 0.0).
    ``tied`` shares the MLP trunk of PF with PB (learned PB only) and with log F. ``debug`` is passed to
    ``HyperGrid(debug=...)``; train_hypergrid.py passes ``__debug__`` (True unless ``python -O``), which adds
    runtime guards, the library default is False.

    Every ``eval_every`` iterations (counted from 1) and after the last one, ``on_eval(iteration,
    trajectories_so_far, log_pf_table, log_z)`` is called with the float64 [height**ndim, ndim + 1] log P_F table
    (masked actions -inf) and log Z (learned ``logZ`` for TB; ``logF(s0)`` for DB / SubTB). Evaluation time is
    not counted in the per-iteration times.

    Returns a dict with ``times`` (seconds per iteration), ``median_time``, ``terminal_states`` (LongTensor
    [iterations * batch_size, ndim], in visiting order), ``log_pf_table`` and ``log_z`` of the final policy,
    ``losses`` (per iteration), and the torchgfn ``env`` and ``gflownet`` objects (e.g. for
    ``gflownet.sample_terminating_states(env, n)``).
    """
    from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
    from gfn.gflownet import DBGFlowNet, SubTBGFlowNet, TBGFlowNet
    from gfn.gym import HyperGrid
    from gfn.preprocessors import KHotPreprocessor
    from gfn.utils.common import set_seed
    from gfn.utils.modules import MLP, DiscreteUniform

    loss = loss.lower()
    if loss not in ("tb", "db", "subtb"):
        raise ValueError(f"loss must be 'tb', 'db' or 'subtb', got {loss!r}")
    dev = torch.device(device)
    set_seed(seed)
    env = HyperGrid(
        ndim,
        height,
        device=dev,
        reward_fn_str="original",
        reward_fn_kwargs={"R0": r0, "R1": r1, "R2": r2},
        debug=debug,
    )
    pre = KHotPreprocessor(height=height, ndim=ndim)
    n_act = env.n_actions  # ndim + 1, exit last
    pf_module = MLP(input_dim=pre.output_dim, output_dim=n_act, hidden_dim=hidden, n_hidden_layers=n_hidden)
    trunk = pf_module.trunk if tied else None
    if uniform_pb:
        pb_module = DiscreteUniform(n_act - 1)
    else:
        pb_module = MLP(
            input_dim=pre.output_dim, output_dim=n_act - 1, hidden_dim=hidden, n_hidden_layers=n_hidden, trunk=trunk
        )
    pf = DiscretePolicyEstimator(module=pf_module, n_actions=n_act, preprocessor=pre)
    pb = DiscretePolicyEstimator(module=pb_module, n_actions=n_act, is_backward=True, preprocessor=pre)
    if loss == "tb":
        gfn = TBGFlowNet(pf=pf, pb=pb, init_logZ=0.0)
    else:
        logf = ScalarEstimator(
            module=MLP(
                input_dim=pre.output_dim, output_dim=1, hidden_dim=hidden, n_hidden_layers=n_hidden, trunk=trunk
            ),
            preprocessor=pre,
        )
        if loss == "db":
            gfn = DBGFlowNet(pf=pf, pb=pb, logF=logf)
        else:
            gfn = SubTBGFlowNet(pf=pf, pb=pb, logF=logf, weighting=subtb_weighting, lamda=subtb_lambda)
    gfn = gfn.to(dev)
    named = dict(gfn.named_parameters())  # shared (tied) parameters appear once
    optimizer = torch.optim.AdamW(
        [
            {"params": [v for k, v in named.items() if k != "logZ"], "lr": lr, "weight_decay": weight_decay},
            {"params": [named["logZ"]] if "logZ" in named else [], "lr": lr_logz, "weight_decay": 0.0},
        ]
    )
    reduction = "sum" if loss == "subtb" else "mean"  # as train_hypergrid.py
    all_states = env.States(_grid_states(ndim, height).to(dev))
    s0 = env.States(env.s0.unsqueeze(0).clone())
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def snapshot() -> tuple[torch.Tensor, float | None]:
        with torch.no_grad():
            dist = gfn.pf.to_probability_distribution(all_states, gfn.pf(all_states))
            table = torch.log_softmax(dist.logits.double(), dim=-1).cpu()  # logits are already log-softmaxed
            log_z = float(gfn.logZ.item()) if loss == "tb" else float(gfn.logF(s0).item())
        return table, log_z

    times: list[float] = []
    losses: list[float] = []
    terminals: list[torch.Tensor] = []
    for it in range(1, iterations + 1):
        sync()
        t0 = time.perf_counter()
        trajectories = gfn.sample_trajectories(env, n=batch_size, save_logprobs=True, save_estimator_outputs=False)
        training_samples = gfn.to_training_samples(trajectories)
        optimizer.zero_grad()
        loss_value = gfn.loss(env, training_samples, recalculate_all_logprobs=False, reduction=reduction)
        loss_value.backward()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss_value.item()))
        terminals.append(trajectories.terminating_states.tensor.detach().long().cpu())
        if on_eval is not None and ((eval_every and it % eval_every == 0) or it == iterations):
            table, log_z = snapshot()
            on_eval(it, it * batch_size, table, log_z)
    table, log_z = snapshot()
    return {
        "times": times,
        "median_time": float(torch.tensor(times).median().item()) if times else float("nan"),
        "terminal_states": torch.cat(terminals) if terminals else torch.zeros(0, ndim, dtype=torch.long),
        "log_pf_table": table,
        "log_z": log_z,
        "losses": losses,
        "env": env,
        "gflownet": gfn,
    }
