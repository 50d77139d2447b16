"""Two-process training harness for tests/test_train.py (run under ``torchrun --nproc_per_node 2``).

Usage: ``dist_train_script.py OUT_DIR PARAMS_DIR [onestep]``. Trains a tiny linear regression with genkit's Trainer
(gloo, CPU); rank 1 returns a NaN loss on its second call, so both ranks must skip that step together.
Afterwards the harness (not the trainer) writes each rank's parameters, EMA and a digest of the data it saw
to ``PARAMS_DIR/rank{r}.safetensors``; the same regression with 2 accumulated micro-batches of 2 per rank goes
to ``PARAMS_DIR/accum{r}.safetensors``, and the Game with 2 micro-batches a step to
``PARAMS_DIR/gameaccum{r}.safetensors``. In the same launch it trains the data-free objective
:class:`ReverseKL` (into ``OUT_DIR-free``) and the alternating two-optimizer :class:`Game` fed by the batch
source :class:`NormalSource` (into ``OUT_DIR-game``), written to ``PARAMS_DIR/{free,game}{r}.safetensors``.
The test file uses these objectives too. With ``onestep``, then genkit's one-step families: MeanFlow (its JVP runs
inside the DDP-wrapped loss, on the module itself) on data into ``OUT_DIR-meanflow``, and SMD (data-free, two
alternating optimizers: 5 score updates per generator update) into ``OUT_DIR-smd``, plus an SMD run cut after its
step-4 checkpoint (mid-way through the score updates) and resumed by a fresh trainer into ``OUT_DIR-smd-cut``, written
to ``PARAMS_DIR/{meanflow,smd,smdcut}{r}.safetensors``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from genkit.models import FAMILIES
from genkit.objective import ParamGroup
from genkit.train import TrainConfig, Trainer

FAMILY = "test-dist-linreg"
TARGET = (1.0, -0.5)  # ReverseKL's target mean; its unit-variance Gaussian has log Z = log(2 pi)


class LinReg(nn.Module):
    """y = w.x + b on rows ``[x_1, x_2, x_3, y]``; returns NaN on the calls listed in ``nan_calls``."""

    def __init__(self, dim: int = 3, nan_calls: tuple[int, ...] = ()):
        super().__init__()
        self.dim, self.nan_calls = dim, tuple(nan_calls)
        self.lin = nn.Linear(dim, 1)
        self.calls, self.seen = 0, 0.0

    def loss(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        self.calls += 1
        self.seen += float(batch.double().sum())
        x, y = batch[:, : self.dim], batch[:, self.dim]
        loss = ((self.lin(x).squeeze(-1) - y) ** 2).mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach())}

    def config(self) -> dict:
        return {"family": FAMILY, "dim": self.dim}

    @classmethod
    def from_config(cls, config: dict) -> LinReg:
        return cls(config["dim"])


FAMILIES.register(FAMILY)(LinReg)


class Gauss(nn.Module):
    """A model: ``x = mu + exp(log_s) * z``, ``z ~ N(0, I)`` in 2-D."""

    def __init__(self) -> None:
        super().__init__()
        self.mu, self.log_s = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
        self.lin = nn.Linear(2, 2)  # a 2-D weight, so default grouping (decay / no_decay) has both kinds

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mu + self.log_s.exp() * self.lin(z)

    def config(self) -> dict:
        return {"family": "test-dist-gauss"}

    @classmethod
    def from_config(cls, config: dict) -> Gauss:
        return cls()


FAMILIES.register("test-dist-gauss")(Gauss)


class ReverseKL(nn.Module):
    """Data-free: fits ``Gauss`` to ``exp(-|x - TARGET|^2 / 2)`` by the reparameterised reverse KL, and a log
    normaliser ``log_z`` (the objective's own parameter, at 100x the LR) by regression on ``-E - log q``."""

    data_free = True

    def __init__(self, n: int = 16) -> None:
        super().__init__()
        self.model, self.n = Gauss(), n
        self.log_z = nn.Parameter(torch.zeros(()))
        self.seen = 0.0

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("model", list(self.model.parameters())),
                ParamGroup("log_z", [self.log_z], lr_scale=100.0, weight_decay=0.0)]

    def loss(self, batch: None, generator: torch.Generator | None = None):
        assert batch is None
        z = torch.randn(self.n, 2, generator=generator)
        self.seen += float(z.double().sum())
        x = self.model(z)
        energy = 0.5 * (x - torch.tensor(TARGET)).pow(2).sum(1)
        jac = torch.linalg.slogdet(self.model.lin.weight)[1] + self.model.log_s.sum()
        log_q = -0.5 * z.pow(2).sum(1) - jac - torch.log(torch.tensor(2 * torch.pi))
        kl = (log_q + energy).mean()
        z_fit = (self.log_z - (-energy - log_q).detach()).pow(2).mean()
        return kl + z_fit, {"kl": float(kl.detach())}


class Gen(nn.Module):
    """The generator model of :class:`Game`: ``x = a * z + b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.a * z + self.b

    def config(self) -> dict:
        return {"family": "test-dist-gen"}

    @classmethod
    def from_config(cls, config: dict) -> Gen:
        return cls()


FAMILIES.register("test-dist-gen")(Gen)


class NormalSource:
    """A batch source: 8 samples of N((2, -1), 0.25 I) per step, drawn with the trainer's generator only."""

    def batch(self, step: int, rank: int, generator: torch.Generator) -> torch.Tensor:
        return torch.tensor([2.0, -1.0]) + 0.5 * torch.randn(8, 2, generator=generator)


class Game(nn.Module):
    """A generator / critic pair: ``critic`` steps twice for each ``gen`` step (steps 2, 5, 8, ... update the
    generator). The linear critic ``w`` maximises ``w.(E x_real - E x_fake) - |w|^2``; the generator
    maximises ``w.E x_fake``. Both losses reach both parameter sets (no unused parameters under DDP)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Gen()
        self.critic = nn.Linear(2, 1, bias=False)
        self.seen, self.updates, self.history = 0.0, [], []

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("gen", list(self.model.parameters())), ParamGroup("critic", [self.critic.weight])]

    def optimizers(self) -> dict[str, list[str]]:
        return {"gen": ["gen"], "critic": ["critic"]}

    def update(self, step: int) -> str:
        return "gen" if step % 3 == 2 else "critic"

    def loss(self, batch: torch.Tensor, generator: torch.Generator | None = None, update: str | None = None):
        self.seen += float(batch.double().sum())
        self.updates.append(update)
        fake = self.model(torch.randn(batch.shape, generator=generator))
        gap = self.critic(batch).mean() - self.critic(fake).mean()
        if update == "critic":
            loss = -gap + self.critic.weight.pow(2).sum()
        else:
            loss = -self.critic(fake).mean()
        self.history.append((update, float(loss.detach())))
        return loss, {"gap": float(gap.detach()), f"{update}_loss": float(loss.detach())}


def make_data(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3 + 0.1 * torch.randn(n, generator=g)
    return torch.cat([x, y[:, None]], dim=1)


def make_model(nan_calls: tuple[int, ...] = ()) -> LinReg:
    torch.manual_seed(0)
    return LinReg(nan_calls=nan_calls)


def config(out_dir: str, batch_size: int, **changes) -> TrainConfig:
    base = dict(steps=6, batch_size=batch_size, lr=0.05, ema_decay=0.9, checkpoint_every=3, log_every=2,
                grad_clip=None, nonfinite="skip", out_dir=out_dir, progress=False, cpu=True)
    return TrainConfig(**{**base, **changes})


def objective_config(out_dir: str, **changes) -> TrainConfig:
    """The settings of the ReverseKL and Game runs (here and in the test file)."""
    base = dict(steps=9, batch_size=8, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, ema_decay=0.9, checkpoint_every=3,
                log_every=3, weight_decay=0.01, out_dir=out_dir, progress=False, cpu=True)
    return TrainConfig(**{**base, **changes})


def record(objective: nn.Module, result, path: Path) -> None:
    """Every tensor of ``objective`` (model and own), the EMA, the losses and what this rank drew."""
    from safetensors.torch import save_file

    tensors = {f"param.{k}": v.detach().clone() for k, v in objective.state_dict().items()}
    tensors.update({f"ema.{k}": v.clone() for k, v in result.ema.items()})
    tensors["seen"] = torch.tensor(objective.seen, dtype=torch.float64)
    tensors["skipped"] = torch.tensor(result.skipped)
    tensors["losses"] = torch.tensor([loss for _, loss in result.losses], dtype=torch.float64)
    save_file(tensors, str(path))


class _Cut(Exception):
    pass


def cut_at(step: int):
    """A callback that stops a run (on every rank) after the log step ``step``, its checkpoint written."""
    def callback(trainer: Trainer, record) -> None:
        if record.step == step:
            raise _Cut
    return callback


def onestep_config(out_dir: str, **changes) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=1e-2, ema_decay=0.9, checkpoint_every=4, log_every=4, out_dir=out_dir,
                progress=False, cpu=True)
    return TrainConfig(**{**base, **changes})


def train_onestep(out_dir: str, params_dir: Path, rank: int) -> None:
    from genkit.models import SMD, MeanFlow

    class Seen(MeanFlow):  # MeanFlow, plus a digest of the batches this rank trained on
        seen = 0.0

        def loss(self, batch, generator=None):
            self.seen += float(batch.double().sum())
            return super().loss(batch, generator=generator)

    example, data = MeanFlow.example()
    meanflow = Seen(example.net, sample_shape=example.sample_shape, frac_r_neq_t=example.frac_r_neq_t)
    data = torch.cat([data, -data])  # 64 points: each rank trains on its own part of every batch
    result = Trainer(meanflow, onestep_config(out_dir + "-meanflow", steps=6)).fit(data)
    record(meanflow, result, params_dir / f"meanflow{rank}.safetensors")
    smd, _ = SMD.example()
    result = Trainer(smd, onestep_config(out_dir + "-smd")).fit()
    smd.seen = 0.0
    record(smd, result, params_dir / f"smd{rank}.safetensors")
    cut, _ = SMD.example()
    try:
        Trainer(cut, onestep_config(out_dir + "-smd-cut"), callbacks=[cut_at(4)]).fit()
    except _Cut:
        pass
    resumed, _ = SMD.example()
    with torch.no_grad():  # another init: the resume must restore every tensor
        for p in resumed.parameters():
            p.add_(1.0)
    result = Trainer(resumed, onestep_config(out_dir + "-smd-cut")).fit()
    resumed.seen = 0.0
    record(resumed, result, params_dir / f"smdcut{rank}.safetensors")


def main() -> None:
    out_dir, params_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    model = make_model(nan_calls=(2,) if rank == 1 else ())
    result = Trainer(model, config(out_dir, batch_size=4)).fit(make_data())
    record(model, result, params_dir / f"rank{rank}.safetensors")
    accum = make_model()  # 2 micro-batches of 2 per rank and step: the global batch of 8 of a single process
    result = Trainer(accum, config(out_dir + "-accum", batch_size=2, gradient_accumulation_steps=2)).fit(make_data())
    record(accum, result, params_dir / f"accum{rank}.safetensors")
    torch.manual_seed(0)
    free = ReverseKL()
    record(free, Trainer(free, objective_config(out_dir + "-free")).fit(), params_dir / f"free{rank}.safetensors")
    torch.manual_seed(0)
    game = Game()
    result = Trainer(game, objective_config(out_dir + "-game")).fit(NormalSource())
    record(game, result, params_dir / f"game{rank}.safetensors")
    torch.manual_seed(0)
    game = Game()  # the same, 2 micro-batches a step: no DDP sync on the first, unused parameters found
    result = Trainer(game, objective_config(out_dir + "-gameaccum", gradient_accumulation_steps=2)).fit(NormalSource())
    record(game, result, params_dir / f"gameaccum{rank}.safetensors")
    if "onestep" in sys.argv[3:]:
        train_onestep(out_dir, params_dir, rank)


if __name__ == "__main__":
    main()
