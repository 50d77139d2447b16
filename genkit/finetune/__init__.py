"""Reward fine-tuning and reward-guided sampling: the shared reward interface (:mod:`genkit.finetune.rewards`) and
SVDD, soft value-based decoding of masked diffusion (:mod:`genkit.finetune.svdd`; importing this package registers
the ``svdd`` sampler)."""

from .rewards import Reward, as_reward
from .svdd import SVDDSampler

__all__ = ["Reward", "SVDDSampler", "as_reward"]
