"""The GFlowNet as a genkit model family: ``gflownet`` (:class:`GFlowNet`), registered in
:data:`genkit.models.FAMILIES`.

The model is an environment (recorded by its ``config()``) and a :class:`~genkit.models.gflownet.Policy`; it
trains data-free through :class:`genkit.train.Trainer`: ``loss(None, generator)`` rolls out ``batch_size``
trajectories of the policy (exploring by ``epsilon`` / ``temperature``), adds as many replayed ones when
``replay > 0`` (a buffer of that capacity, ``replay_prioritized``: drawn in proportion to ``R``), and returns the
chosen loss (``"tb"``, ``"db"``, ``"subtb"``, ``"fm"``; :mod:`genkit.models.gflownet.losses`). ``log Z`` sits in
its own parameter group at ``log_z_lr_scale`` times the policy's learning rate (100: the papers' 0.1 against 1e-3)
and without weight decay. It samples terminal objects ``[n, *state_shape]`` (integer states) through the
``policy`` sampler, the forward policy rolled out from the initial state without exploration.

>>> model = GFlowNet({"name": "hypergrid", "ndim": 2, "height": 4}, hidden=16, batch_size=8)
>>> loss, logs = model.loss(None, generator=torch.Generator().manual_seed(0))
>>> model.sample(3, generator=torch.Generator().manual_seed(0)).shape
torch.Size([3, 2])
"""

from __future__ import annotations

import argparse
import json
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...checks import check_device, check_generator
from ...errors import ConfigError
from ...objective import ParamGroup, default_groups
from ...sampling import SAMPLERS, PolicySampler, Sampler
from ...solvers import Solution
from ..registry import FAMILIES
from . import exact
from .env import ENVIRONMENTS, Environment, get_env
from .losses import (
    LOSSES,
    WEIGHTINGS,
    check_lambda,
    detailed_balance,
    flow_matching,
    subtrajectory_balance,
    trajectory_balance,
)
from .policy import BACKWARD, Policy
from .replay import ReplayBuffer, concat
from .trajectories import Trajectories, check_exploration, sample_trajectories, score_trajectories

__all__ = ["GFlowNet"]


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"gflownet {name} must be an integer >= {low}; got {value!r}")
    return int(value)


@FAMILIES.register("gflownet")
class GFlowNet(nn.Module):
    """``GFlowNet(env, *, loss="tb", hidden=256, depth=2, backward="uniform", tied=False, forward_looking=False,
    subtb_lambda=0.9, weighting="geometric", epsilon=0.0, temperature=1.0, batch_size=16, replay=0,
    replay_prioritized=False, log_z_lr_scale=100.0, s0_flow="log_z", seed=0)``.

    ``env`` is an :class:`~genkit.models.gflownet.Environment`, its registry name or its config. ``s0_flow``
    (db / subtb): ``"log_z"`` makes the learned scalar ``log Z`` the flow of the initial state (so SubTB with TB
    weighting is TB, and ``log Z`` trains at ``log_z_lr_scale`` times the rate); ``"head"`` reads ``log F(s_0)``
    from the state-flow head instead, as torchgfn's DB / SubTB do (the model then has no ``log Z`` parameter; its
    ``log_z()`` is the head at ``s_0``).
    """

    family = "gflownet"
    #: samples are integer states: rsample refuses; two seeds may draw the same object
    discrete: ClassVar[bool] = True
    #: the loss makes its own trajectories: Trainer.fit() takes no data
    data_free: ClassVar[bool] = True
    exact_likelihood: ClassVar[bool] = False

    def __init__(self, env: str | dict[str, Any] | Environment, *, loss: str = "tb", hidden: int = 256,
                 depth: int = 2, backward: str = "uniform", tied: bool = False, forward_looking: bool = False,
                 subtb_lambda: float = 0.9, weighting: str = "geometric", epsilon: float = 0.0,
                 temperature: float = 1.0, batch_size: int = 16, replay: int = 0, replay_prioritized: bool = False,
                 log_z_lr_scale: float = 100.0, s0_flow: str = "log_z", seed: int = 0):
        super().__init__()
        self.env = get_env(env)
        if loss not in LOSSES:
            raise ConfigError(f"unknown gflownet loss {loss!r}; choose one of {LOSSES} (tb: trajectory balance, db: "
                              "detailed balance, subtb: sub-trajectory balance, fm: flow matching)")
        if backward not in BACKWARD:
            raise ConfigError(f"unknown backward policy {backward!r}; choose one of {BACKWARD}")
        if loss == "fm" and backward != "uniform":
            raise ConfigError("flow matching has no backward policy (its edge flows fix P_B); drop backward="
                              f"{backward!r} or pick loss tb / db / subtb")
        for name, flag in (("tied", tied), ("forward_looking", forward_looking),
                           ("replay_prioritized", replay_prioritized)):
            if not isinstance(flag, bool):
                raise ConfigError(f"gflownet {name} must be True or False; got {flag!r}")
        if forward_looking and loss not in ("db", "subtb"):
            raise ConfigError(f"forward_looking reparameterises the state flows of db / subtb; loss {loss!r} has "
                              "none. Use loss='db' or 'subtb', or drop forward_looking")
        if forward_looking and not self.env.intermediate_reward:
            raise ConfigError(f"forward-looking flows need a reward on every state; the {self.env.name} environment "
                              "rewards terminal objects only. Drop forward_looking")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown SubTB weighting {weighting!r}; choose one of {WEIGHTINGS}")
        self.loss_name, self.backward, self.tied, self.forward_looking = loss, backward, tied, forward_looking
        self.subtb_lambda, self.weighting = check_lambda(subtb_lambda), weighting
        self.epsilon, self.temperature = check_exploration(epsilon, temperature)
        self.hidden, self.depth = _positive_int("hidden", hidden), _positive_int("depth", depth)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.replay = _positive_int("replay", replay, 0)
        self.replay_prioritized = replay_prioritized
        if replay_prioritized and not self.replay:
            raise ConfigError("replay_prioritized draws from a replay buffer; set replay=CAPACITY (> 0) too")
        if isinstance(log_z_lr_scale, bool) or not isinstance(log_z_lr_scale, numbers.Real) or not (
                0 < log_z_lr_scale < 1e6):
            raise ConfigError(f"log_z_lr_scale must be a number > 0 (log Z's learning rate over the policy's; 100 is "
                              f"the papers' 0.1 / 1e-3); got {log_z_lr_scale!r}")
        self.log_z_lr_scale = float(log_z_lr_scale)
        if s0_flow not in ("log_z", "head"):
            raise ConfigError(f"s0_flow must be 'log_z' (the learned scalar is log F(s_0)) or 'head' (the flow head at "
                              f"s_0, as torchgfn's DB / SubTB); got {s0_flow!r}")
        if s0_flow == "head" and loss not in ("db", "subtb"):
            raise ConfigError(f"s0_flow='head' reads log F(s_0) from the state-flow head of db / subtb; loss {loss!r} "
                              "has none. Drop s0_flow")
        self.s0_flow = s0_flow
        self.seed = _positive_int("seed", seed, 0)
        with torch.random.fork_rng(devices=[]):  # the initial weights follow the config's seed alone
            torch.manual_seed(self.seed)
            self.policy = Policy(self.env.input_dim, self.env.n_actions, self.env.n_backward, hidden=self.hidden,
                                 depth=self.depth, backward=backward, flow=loss in ("db", "subtb"),
                                 log_z=loss != "fm" and s0_flow == "log_z", tied=tied)
        self.buffer = ReplayBuffer(self.env, self.replay, prioritized=replay_prioritized) if self.replay else None
        #: the distinct modes among the terminal objects of every fresh training trajectory so far (logged as
        #: "modes_found": the mode-discovery curve against trajectories; saved with the resume state, as the
        #: replay buffer is: :meth:`run_state`)
        self.modes_seen: set[tuple[int, ...]] = set()

    # --- shapes and devices ---------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.env.state_shape)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # --- log Z ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_z(self) -> Tensor:
        """The learned ``log Z`` (detached): the parameter (tb / db / subtb), or the out-flow of the initial state
        (fm)."""
        if self.policy.log_z is not None:
            return self.policy.log_z.detach().clone()
        s0 = self.env.initial(1, self._device())
        if self.s0_flow == "head":
            flow = self.policy(self.env.to_input(s0)).log_flow[0]
            return flow + self.env.log_reward(s0)[0].to(flow.dtype) if self.forward_looking else flow
        logits = self.policy(self.env.to_input(s0)).forward_logits
        return logits.masked_fill(~self.env.forward_mask(s0), -torch.inf).logsumexp(-1)[0]

    # --- training -------------------------------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        nets = [p for name, p in self.named_parameters() if name != "policy.log_z"]
        groups = default_groups(nets)
        if self.policy.log_z is not None:
            groups.append(ParamGroup("log_z", [self.policy.log_z], lr_scale=self.log_z_lr_scale, weight_decay=0.0))
        return groups

    def trajectories(self, n: int, generator: torch.Generator | None = None, *, explore: bool = True
                     ) -> Trajectories:
        """``n`` trajectories of the policy (exploring by the model's ``epsilon`` / ``temperature`` when
        ``explore``), without gradients (:meth:`objective` scores them)."""
        eps, temp = (self.epsilon, self.temperature) if explore else (0.0, 1.0)
        return sample_trajectories(self.env, self.policy, n, generator=generator, epsilon=eps, temperature=temp,
                                   device=self._device())

    def objective(self, traj: Trajectories) -> Tensor:
        """The model's loss on ``traj``, scored by the current policy."""
        if self.loss_name == "fm":
            return flow_matching(self.env, self.policy, traj)
        scores = score_trajectories(self.env, self.policy, traj)
        log_z = self.policy.log_z
        if self.loss_name == "tb":
            return trajectory_balance(traj, scores, log_z)
        state_r = None
        if self.forward_looking:
            flat = traj.states.flatten(0, 1)
            state_r = self.env.log_reward(flat).reshape(traj.states.shape[:2]).to(scores.log_pf.dtype)
        if self.s0_flow == "head":  # log F(s_0) from the flow head, per trajectory (all start at s_0)
            log_z = scores.log_flow[0] + (state_r[0] if state_r is not None else 0)
        if self.loss_name == "db":
            return detailed_balance(traj, scores, log_z, state_r)
        return subtrajectory_balance(traj, scores, log_z, lamda=self.subtb_lambda, weighting=self.weighting,
                                     state_log_reward=state_r)

    def loss(self, batch: Any = None, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The chosen loss on ``batch_size`` fresh trajectories (plus as many replayed ones with ``replay``)."""
        check_generator(generator, f"{self.family}.loss")
        if batch is not None:
            raise ConfigError(f"a gflownet trains on its own trajectories in the {self.env.name} environment "
                              "(data_free): call loss(None) / Trainer.fit() without data")
        traj = self.trajectories(self.batch_size, generator)
        if self.buffer is not None:
            self.buffer.add(traj)
            traj = concat([traj, self.buffer.sample(self.batch_size, generator)])
        loss = self.objective(traj)
        logs = {self.loss_name: float(loss.detach()), "log_reward": float(traj.log_reward[:self.batch_size].mean()),
                "length": float(traj.lengths[:self.batch_size].float().mean())}
        if type(self.env).modes is not Environment.modes:  # the environment says what a mode is
            fresh = traj.terminal[:self.batch_size]
            self.modes_seen.update(exact._keys(fresh[self.env.modes(fresh)].cpu()))
            logs["modes_found"] = float(len(self.modes_seen))
        if self.loss_name != "fm":
            logs["log_z"] = float(self.log_z())
        return loss, logs

    # --- resume state ---------------------------------------------------------------------------------------
    def run_state(self) -> dict[str, Tensor]:
        """What training keeps besides the weights (the objective contract's ``run_state``): the replay
        buffer's trajectories (``buffer.*``) and the modes found so far (``modes_seen``, ``[k, object size]``
        int64, sorted)."""
        state = {f"buffer.{k}": v for k, v in (self.buffer.state_dict() if self.buffer is not None else {}).items()}
        if self.modes_seen:
            state["modes_seen"] = torch.tensor(sorted(self.modes_seen), dtype=torch.int64)
        return state

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        """Take back :meth:`run_state` (an empty dict: an empty buffer and no modes found)."""
        extra = sorted(k for k in state if k != "modes_seen" and not k.startswith("buffer."))
        if extra or (self.buffer is None and any(k.startswith("buffer.") for k in state)):
            raise ConfigError(f"this gflownet's run state has no {extra or 'replay buffer'} (replay={self.replay}); "
                              "resume with the settings the checkpoint was trained with")
        if self.buffer is not None:
            self.buffer.load_state_dict({k[len("buffer."):]: v for k, v in state.items() if k.startswith("buffer.")},
                                        device=self._device())
        modes = state.get("modes_seen")
        self.modes_seen = set() if modes is None else {tuple(row) for row in modes.tolist()}

    # --- sampling -------------------------------------------------------------------------------------------
    def samplers(self) -> tuple[str, ...]:
        return ("policy",)

    def default_sampler(self) -> Sampler:
        return PolicySampler()

    def get_sampler(self, sampler: str | Sampler | None = None, **options: Any) -> Sampler:
        """The sampler named (with ``options``) or given; the ``policy`` sampler by default."""
        if sampler is None or isinstance(sampler, str):
            name = "policy" if sampler is None else sampler
            if name not in self.samplers():
                raise ConfigError(f"{self.family} samples with {self.samplers()}; got sampler {sampler!r}")
            return SAMPLERS.get(name)(**{k: v for k, v in options.items() if v is not None or k != "steps"})
        if options:
            raise ConfigError(f"{sorted(options)} were given beside the sampler object {sampler!r}; build the "
                              "sampler with them instead")
        if not isinstance(sampler, Sampler) or sampler.name not in self.samplers():
            raise ConfigError(f"{self.family} samples with {self.samplers()}; got sampler {sampler!r}")
        return sampler

    def rollout(self, start: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """The policy sampler's pass: trajectories from ``start`` (the initial states) without exploration; the
        terminal objects and the policy evaluations of the longest trajectory."""
        traj = sample_trajectories(self.env, self.policy, len(start), generator=generator, device=start.device,
                                   start=start)
        return traj.terminal, int(traj.lengths.max())

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | Sampler | None = None, generator: torch.Generator | None = None,
               device: Any = None, return_solution: bool = False, labels: None = None, **options: Any
               ) -> Tensor | Solution:
        """``n`` terminal objects ``[n, *state_shape]`` of the forward policy (the ``policy`` sampler)."""
        if labels is not None:
            raise ConfigError(f"{self.family} models are unconditional; got labels={labels!r} (drop --class)")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ConfigError(f"n must be a positive integer; got {n!r}")
        sampler = self.get_sampler(sampler, **options)
        check_generator(generator, f"{self.family}.sample")
        device = check_device(device, f"{self.family}.sample") if device is not None else self._device()
        sol = sampler.sample(self, self.env.initial(int(n), device), generator=generator)
        return sol if return_solution else sol.samples

    def rsample(self, n: int, **options: Any) -> Tensor:
        """Not available: a GFlowNet's objects are discrete, so they have no pathwise derivative."""
        raise ConfigError(f"{self.family} samples discrete objects, which have no pathwise derivative (rsample); use "
                          "sample(n)")

    # --- exact evaluation -----------------------------------------------------------------------------------
    def terminal_distribution(self) -> Tensor:
        """float64 ``[n_states]``: the policy's exact ``P_T`` over ``env.all_states()`` (enumerable environments)."""
        return exact.terminal_distribution(self.env, self.policy)

    @torch.no_grad()
    def target_report(self, samples: Tensor | None = None) -> dict[str, Any]:
        """What train.py and evaluate.py report (:func:`genkit.models.gflownet.exact.report`): on an enumerable
        environment the policy's exact ``P_T`` against ``R / Z`` (L1 in both conventions, JSD) and the learned and
        exact ``log Z``; for ``samples`` (terminal objects) their empirical L1, modes and reward statistics."""
        return {"env": self.env.config(), "loss": self.loss_name,
                **exact.report(self.env, self.terminal_distribution, float(self.log_z()), samples)}

    @torch.no_grad()
    def picture(self, samples: Tensor) -> dict[str, Tensor] | None:
        """Heatmaps for a 2-D hypergrid (``{name: [H, H]}``: the samples' histogram, the policy's exact ``P_T``
        and the target ``R / Z``); None for other environments (the scripts then draw the samples themselves)."""
        env = self.env
        if env.name != "hypergrid" or env.ndim != 2:
            return None
        shape = (env.height, env.height)
        return {f"samples (n = {len(samples)})": exact.empirical_distribution(env, samples).reshape(shape),
                "policy P_T (exact)": self.terminal_distribution().reshape(shape),
                "target R / Z": exact.true_distribution(env).reshape(shape)}

    # --- config ---------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"family": self.family, "env": self.env.config(), "loss": self.loss_name, "hidden": self.hidden,
                "depth": self.depth, "backward": self.backward, "tied": self.tied,
                "forward_looking": self.forward_looking, "subtb_lambda": self.subtb_lambda,
                "weighting": self.weighting, "epsilon": self.epsilon, "temperature": self.temperature,
                "batch_size": self.batch_size, "replay": self.replay, "replay_prioritized": self.replay_prioritized,
                "log_z_lr_scale": self.log_z_lr_scale, "s0_flow": self.s0_flow, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GFlowNet:
        config = dict(config)
        if config.pop("family", cls.family) != cls.family:
            raise ConfigError(f"not a {cls.family} config: {config!r}")
        if "env" not in config:
            raise ConfigError(f"a {cls.family} config needs its 'env' (the environment's config); got {config!r}")
        return cls(config.pop("env"), **config)

    # --- the family registry's hooks ------------------------------------------------------------------------
    #: TB (uniform P_B), TB with a learned P_B, DB, forward-looking DB, SubTB on a bit-sequence DAG, FM
    example_variants: ClassVar[tuple[str, ...]] = ("default", "learned_pb", "db", "fl_db", "subtb_bitseq", "fm",
                                                   "db_head")

    @classmethod
    def example(cls, variant: str = "default") -> tuple[GFlowNet, None]:
        """A tiny seeded GFlowNet (hypergrid 2-D height 4, or 4-bit sequences filled in any order) with
        non-trivial weights; data-free, so the batch is None."""
        options: dict[str, Any] = {
            "default": {}, "learned_pb": {"backward": "learned"}, "db": {"loss": "db"},
            "fl_db": {"loss": "db", "forward_looking": True}, "fm": {"loss": "fm"},
            "subtb_bitseq": {"loss": "subtb", "backward": "learned", "tied": True},
            "db_head": {"loss": "db", "s0_flow": "head", "forward_looking": True},
        }.get(variant)
        if options is None:
            raise ConfigError(f"{cls.family}.example variants are {cls.example_variants}; got {variant!r}")
        env = ({"name": "bitseq", "length": 4, "word": 1, "order": "any", "n_modes": 2} if variant == "subtb_bitseq"
               else {"name": "hypergrid", "ndim": 2, "height": 4})
        model = cls(env, hidden=16, batch_size=8, **options)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return model, None

    #: train.py fills these where the flag is not given
    cli_defaults: ClassVar[dict[str, Any]] = {"env": "hypergrid"}
    #: train.py's --steps / --batch-size / --lr for this family: 2000 steps of 16 trajectories (32k, the budget of
    #: torchgfn's hypergrid tests) at the papers' 1e-3 (log Z at 100x that)
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 2000, "batch_size": 16, "lr": 1e-3}
    #: the family builds its own networks (train.py's MLP and UNet are for data)
    needs_net: ClassVar[bool] = False

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--env", help=f"environment, one of {', '.join(ENVIRONMENTS.names())} (default: "
                                         "hypergrid); --env-options JSON sets its options, e.g. "
                                         "'{\"ndim\": 2, \"height\": 8, \"r0\": 0.1}'")
        group.add_argument("--env-options", help="the environment's options as a JSON object")
        group.add_argument("--loss", help=f"one of {', '.join(LOSSES)} (default: tb)")
        group.add_argument("--backward", help=f"backward policy, one of {', '.join(BACKWARD)} (default: uniform)")
        group.add_argument("--tied", action="store_const", const=True,
                           help="one trunk for the forward, backward and flow heads (default: separate MLPs)")
        group.add_argument("--forward-looking", action="store_const", const=True,
                           help="--loss db / subtb: forward-looking state flows (needs a reward on every state)")
        group.add_argument("--subtb-lambda", type=float, help="--loss subtb: the geometric weight (default: 0.9)")
        group.add_argument("--weighting", help=f"--loss subtb: one of {', '.join(WEIGHTINGS)} (default: geometric)")
        group.add_argument("--epsilon", type=float, help="share of uniform random actions while training (default: 0)")
        group.add_argument("--temperature", type=float, help="temperature of the policy while training (default: 1)")
        group.add_argument("--replay", type=int, help="replay buffer capacity in trajectories (default: 0, none); each "
                                                      "step trains on --batch-size fresh and as many replayed ones")
        group.add_argument("--replay-prioritized", action="store_const", const=True,
                           help="draw replayed trajectories in proportion to their reward")
        group.add_argument("--log-z-lr-scale", type=float, help="log Z's learning rate over --lr (default: 100)")
        group.add_argument("--s0-flow", help="--loss db / subtb: log F(s_0) is the learned log Z ('log_z', the "
                                             "default) or the flow head ('head', as torchgfn)")

    @classmethod
    def env_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The environment's config from --env / --env-options."""
        options: dict[str, Any] = {}
        if getattr(args, "env_options", None):
            try:
                options = json.loads(args.env_options)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--env-options must be a JSON object like '{{\"ndim\": 2, \"height\": 8}}'; got "
                                  f"{args.env_options!r} ({e})") from None
            if not isinstance(options, dict):
                raise ConfigError(f"--env-options must be a JSON object; got {args.env_options!r}")
        return get_env({"name": args.env, **options}).config()

    @classmethod
    def target_from_args(cls, args: argparse.Namespace) -> tuple[dict[str, Any], tuple[int, ...]]:
        """train.py's hook for a family that trains on its own samples: what it trains toward (recorded in the
        run's train_data.json) and the shape of one sample."""
        config = cls.env_from_args(args)
        return {"env": config}, tuple(get_env(config).state_shape)

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: Any, sample_shape: Sequence[int]) -> GFlowNet:
        options: dict[str, Any] = {"hidden": 256 if args.hidden is None else args.hidden,
                                   "depth": 2 if args.depth is None else args.depth,
                                   "batch_size": args.batch_size, "seed": args.seed}
        keys = ("loss", "backward", "tied", "forward_looking", "subtb_lambda", "weighting", "epsilon", "temperature",
                "replay", "replay_prioritized", "log_z_lr_scale", "s0_flow")
        options.update({k: getattr(args, k) for k in keys if getattr(args, k, None) is not None})
        return cls(cls.env_from_args(args), **options)

    @classmethod
    def net_options(cls, args: argparse.Namespace, kind: str) -> dict[str, Any]:
        return {}
