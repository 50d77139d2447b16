"""Two-process GFlowNet training with a replay buffer for tests/test_gflownet.py (run under ``torchrun
--nproc_per_node 2``, gloo, CPU).

Usage: ``gflownet_dist_script.py OUT_DIR PARAMS_DIR``. Trains the same GFlowNet (prioritised replay, a buffer that
holds less than the run adds) 8 steps straight into ``OUT_DIR-full``, and 4 steps cut after the step-4 checkpoint
into ``OUT_DIR-cut``, then resumed to step 8 by a fresh model with other weights. Each rank writes its weights, its
replay buffer, its modes found and its losses to ``PARAMS_DIR/{full,resumed}{rank}.safetensors``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from genkit.models.gflownet import GFlowNet
from genkit.train import TrainConfig, Trainer


class _Cut(Exception):
    pass


def make() -> GFlowNet:
    return GFlowNet({"name": "hypergrid", "ndim": 2, "height": 8}, hidden=16, batch_size=4, replay=10,
                    replay_prioritized=True, epsilon=0.3, seed=0)


def config(out_dir: str) -> TrainConfig:
    return TrainConfig(steps=8, batch_size=4, lr=1e-2, checkpoint_every=4, log_every=2, ema_decay=None,
                       progress=False, out_dir=out_dir, cpu=True)


def record(model: GFlowNet, result, path: Path) -> None:
    tensors = {f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    tensors.update({f"buffer.{k}": v.clone() for k, v in model.buffer.state_dict().items()})
    tensors["modes"] = torch.tensor(sorted(model.modes_seen), dtype=torch.long)
    tensors["losses"] = torch.tensor([loss for _, loss in result.losses], dtype=torch.float64)
    save_file(tensors, str(path))


def main() -> None:
    out_dir, params_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    full = make()
    record(full, Trainer(full, config(out_dir + "-full")).fit(), params_dir / f"full{rank}.safetensors")

    def cut_at_4(trainer, rec) -> None:
        if rec.step == 4:
            raise _Cut

    try:
        Trainer(make(), config(out_dir + "-cut"), callbacks=[cut_at_4]).fit()
    except _Cut:
        pass
    resumed = make()
    with torch.no_grad():  # other weights: everything must come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    record(resumed, Trainer(resumed, config(out_dir + "-cut")).fit(), params_dir / f"resumed{rank}.safetensors")


if __name__ == "__main__":
    main()
