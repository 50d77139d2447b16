"""Reward fine-tuning and reward-guided sampling: the shared reward interface (:mod:`genkit.finetune.rewards`),
DRAKES, reward backpropagation through a Gumbel-softmax rollout (:mod:`genkit.finetune.drakes`), and SVDD, soft
value-based decoding of masked diffusion (:mod:`genkit.finetune.svdd`; importing this package registers the ``svdd``
sampler)."""

from .drakes import DRAKES
from .rewards import Reward, as_reward
from .svdd import SVDDSampler

__all__ = ["DRAKES", "Reward", "SVDDSampler", "as_reward"]
