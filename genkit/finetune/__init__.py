"""Reward fine-tuning and reward-guided sampling: the shared reward interface (:mod:`genkit.finetune.rewards`),
DRAKES, reward backpropagation through a Gumbel-softmax rollout (:mod:`genkit.finetune.drakes`), SEPO, policy
gradients through the concrete score for non-differentiable rewards (:mod:`genkit.finetune.sepo`), and SVDD, soft
value-based decoding of masked diffusion (:mod:`genkit.finetune.svdd`; importing this package registers the ``svdd``
sampler)."""

from .drakes import DRAKES
from .rewards import Reward, as_reward
from .sepo import SEPO
from .svdd import SVDDSampler

__all__ = ["DRAKES", "Reward", "SEPO", "SVDDSampler", "as_reward"]
