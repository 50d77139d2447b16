"""Two-process training harness for tests/test_train.py (run under ``torchrun --nproc_per_node 2``).

Usage: ``dist_train_script.py OUT_DIR PARAMS_DIR``. Trains a tiny linear regression with genkit's Trainer
(gloo, CPU); rank 1 returns a NaN loss on its second call, so both ranks must skip that step together.
Afterwards the harness (not the trainer) writes each rank's parameters, EMA and a digest of the data it saw
to ``PARAMS_DIR/rank{r}.safetensors``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from genkit.models import FAMILIES
from genkit.train import TrainConfig, Trainer

FAMILY = "test-dist-linreg"


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


def make_data(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3 + 0.1 * torch.randn(n, generator=g)
    return torch.cat([x, y[:, None]], dim=1)


def make_model(nan_calls: tuple[int, ...] = ()) -> LinReg:
    torch.manual_seed(0)
    return LinReg(nan_calls=nan_calls)


def config(out_dir: str, batch_size: int) -> TrainConfig:
    return TrainConfig(steps=6, batch_size=batch_size, lr=0.05, ema_decay=0.9, checkpoint_every=3, log_every=2,
                       grad_clip=None, nonfinite="skip", out_dir=out_dir, progress=False, cpu=True)


def main() -> None:
    from safetensors.torch import save_file

    out_dir, params_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    model = make_model(nan_calls=(2,) if rank == 1 else ())
    result = Trainer(model, config(out_dir, batch_size=4)).fit(make_data())
    tensors = {f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.clone() for k, v in result.ema.items()})
    tensors["seen"] = torch.tensor(model.seen, dtype=torch.float64)
    tensors["skipped"] = torch.tensor(result.skipped)
    tensors["losses"] = torch.tensor([loss for _, loss in result.losses], dtype=torch.float64)
    save_file(tensors, str(params_dir / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
