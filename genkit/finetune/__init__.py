"""Reward fine-tuning and reward-guided sampling: the shared reward interface (:mod:`genkit.finetune.rewards`),
DRAKES, reward backpropagation through a Gumbel-softmax rollout (:mod:`genkit.finetune.drakes`), SEPO, policy
gradients through the concrete score for non-differentiable rewards (:mod:`genkit.finetune.sepo`), and SVDD, soft
value-based decoding of masked diffusion and of continuous models with a stochastic solver
(:mod:`genkit.finetune.svdd`; importing this package registers the ``svdd`` sampler), with its regression-trained
value network (:mod:`genkit.finetune.svdd_value`, SVDD-MC); for continuous models with a stochastic solver, VARD,
value-based dense fine-tuning (:mod:`genkit.finetune.vard`), and its baselines DRaFT and DDPO
(:mod:`genkit.finetune.baselines`), over the Gaussian steps of :mod:`genkit.finetune.gaussian_steps`."""

from .baselines import DDPO, DRaFT
from .drakes import DRAKES
from .gaussian_steps import GaussianChain, step_kl
from .rewards import Reward, as_reward
from .sepo import SEPO
from .svdd import SVDDSampler
from .svdd_value import Rollouts, ValueNetwork, collect_rollouts, fit_value
from .vard import VARD

__all__ = ["DDPO", "DRAKES", "DRaFT", "GaussianChain", "Reward", "Rollouts", "SEPO", "SVDDSampler", "VARD",
           "ValueNetwork", "as_reward", "collect_rollouts", "fit_value", "step_kl"]
