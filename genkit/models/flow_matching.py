"""Flow matching (Lipman et al. 2023, arXiv 2210.02747; Liu et al. 2023, arXiv 2209.03003) with
independent or minibatch optimal-transport coupling (Tong et al. 2024, arXiv 2302.00482).

Training draws ``t ~ U[0, 1]``, pairs data ``x_0`` with noise ``eps`` (independently, or by the exact
OT assignment of the minibatch under squared Euclidean cost, through POT), forms
``x_t = alpha x_0 + sigma eps`` and regresses the network on ``alpha' x_0 + sigma' eps``.
With the linear path this is rectified flow / conditional OT flow matching, torchcfm's
``ConditionalFlowMatcher(sigma=0)`` and ``ExactOptimalTransportConditionalFlowMatcher(sigma=0)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError
from ..paths import Path, path_from_config
from .continuous import ContinuousModel
from .registry import FAMILIES

__all__ = ["FlowMatching", "ot_pairing", "COUPLINGS"]

COUPLINGS = ("independent", "ot")


def ot_pairing(x0: Tensor, x1: Tensor) -> Tensor:
    """Indices ``perm`` such that ``(x0[i], x1[perm[i]])`` is an exact OT assignment (squared Euclidean).

    With equal uniform marginals the exact OT plan is a permutation (Birkhoff), found by POT's network
    simplex; ties are broken by the solver deterministically.
    """
    import ot

    a = x0.detach().flatten(1).double().cpu()
    b = x1.detach().flatten(1).double().cpu()
    cost = torch.cdist(a, b).pow(2).numpy()
    n = a.shape[0]
    plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost)
    return torch.as_tensor(plan.argmax(axis=1), device=x1.device)


@FAMILIES.register("flow_matching")
class FlowMatching(ContinuousModel):
    """A flow-matching model: ``FlowMatching(net, path="linear", coupling="independent")``; the network
    predicts the velocity ``dx_t/dt``. ``num_classes``, ``class_names``, ``null_label``, ``class_dropout`` make it
    class-conditional (see :class:`~genkit.models.continuous.ContinuousModel`).

    >>> import torch
    >>> from genkit.nets import MLP
    >>> model = FlowMatching(MLP(2, hidden=32), sample_shape=(2,))
    >>> model.sample(4, steps=2, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([4, 2])
    """

    family = "flow_matching"

    def __init__(self, net: nn.Module, path: Path | str = "linear", coupling: str = "independent", *,
                 sample_shape: Sequence[int] = (2,), num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, null_label: int | None = None,
                 class_dropout: float = 0.0):
        super().__init__(net, path, "velocity", sample_shape, num_classes=num_classes, class_names=class_names,
                         null_label=null_label, class_dropout=class_dropout)
        if coupling not in COUPLINGS:
            raise ConfigError(f"unknown coupling {coupling!r}; choose one of {COUPLINGS}")
        self.coupling = coupling

    def loss(self, batch: Tensor | tuple[Tensor, Tensor],
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """MSE between the network and the conditional velocity; ``generator`` draws t and the noise (then, for
        a class-conditional model, its class dropout). ``batch`` is ``x [B, ...]``, or ``(x, labels [B])`` for a
        class-conditional model."""
        x0, labels = self.split_batch(batch)
        check_generator(generator, f"{self.family}.loss")
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.coupling == "ot":
            eps = eps[ot_pairing(x0, eps)]
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
        xt = self.path.sample(x0, t, eps)
        target = self.path.from_x0_eps(x0, eps, xt, t, "velocity")
        cond = {} if labels is None else {"labels": self.drop_labels(labels, generator)}
        loss = (self(xt, t, **cond) - target).pow(2).flatten(1).mean(1).mean()
        return loss, {}

    def extra_config(self) -> dict[str, Any]:
        return {"coupling": self.coupling}

    @classmethod
    def example(cls) -> tuple[FlowMatching, Tensor]:
        """A 2-D model (MLP 16 x 1, seeded) and 32 points of a shifted Gaussian."""
        from ..nets import MLP

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = cls(MLP(2, hidden=16, depth=1, time_dim=8), sample_shape=(2,))
        g = torch.Generator().manual_seed(0)
        return model, 0.5 * torch.randn(32, 2, generator=g) + 1.0

    cli_defaults: ClassVar[dict[str, Any]] = {"path": "linear", "coupling": "independent"}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--coupling", help=f"noise-data pairing, one of {', '.join(COUPLINGS)} (default: "
                                              "independent)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: nn.Module, sample_shape: Sequence[int]) -> FlowMatching:
        return cls(net, args.path, args.coupling, sample_shape=sample_shape, **cls.class_options(args))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FlowMatching:
        from ..nets import build as build_net

        return cls(build_net(config["net"]), path_from_config(config["path"]), config["coupling"],
                   sample_shape=config["sample_shape"], **cls.class_config(config))
