"""Reward fine-tuning and reward-guided sampling: the shared reward interface (:mod:`genkit.finetune.rewards`)."""

from .rewards import Reward, as_reward

__all__ = ["Reward", "as_reward"]
