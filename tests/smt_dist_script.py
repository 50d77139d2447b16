"""Two-process SMT / SMD training for tests/test_smt.py (run under ``torchrun --nproc_per_node 2``, gloo, CPU).

Usage: ``smt_dist_script.py OUT_DIR PARAMS_DIR``. Trains ``SMT.example()`` on a fixed data set and the data-free
``SMD.example()`` (an analytic teacher) for 12 steps each (both optimizers step), then writes each rank's
trained tensors to ``PARAMS_DIR/{smt,smd}{rank}.safetensors``.
"""

from __future__ import annotations

import os
import sys

import torch

from genkit.models import SMD, SMT
from genkit.train import TrainConfig, Trainer


def main(out: str, params: str) -> None:
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    data = 0.5 * torch.randn(512, 2, generator=torch.Generator().manual_seed(0)) + 0.5
    for name, (model, _), train_data in (("smt", SMT.example(), data), ("smd", SMD.example(), None)):
        cfg = TrainConfig(steps=12, batch_size=16, lr=1e-3, out_dir=f"{out}-{name}", log_every=4, checkpoint_every=6,
                          progress=False, cpu=True)
        Trainer(model, cfg).fit(train_data)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(params, f"{name}{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
