"""Reward fine-tuning and reward-guided sampling: the shared reward interface (:mod:`genkit.finetune.rewards`),
DRAKES, reward backpropagation through a Gumbel-softmax rollout (:mod:`genkit.finetune.drakes`), SEPO, policy
gradients through the concrete score for non-differentiable rewards (:mod:`genkit.finetune.sepo`), and SVDD, soft
value-based decoding of masked diffusion and of continuous models with a stochastic solver
(:mod:`genkit.finetune.svdd`; importing this package registers the ``svdd`` sampler), with its regression-trained
value network (:mod:`genkit.finetune.svdd_value`, SVDD-MC)."""

from .drakes import DRAKES
from .rewards import Reward, as_reward
from .sepo import SEPO
from .svdd import SVDDSampler
from .svdd_value import Rollouts, ValueNetwork, collect_rollouts, fit_value

__all__ = ["DRAKES", "Reward", "Rollouts", "SEPO", "SVDDSampler", "ValueNetwork", "as_reward", "collect_rollouts",
           "fit_value"]
