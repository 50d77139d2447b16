"""GFlowNets (Bengio et al. 2021, arXiv 2106.04399; Malkin et al. 2022, arXiv 2201.13259; METHODS.md section 10):
environments (:mod:`~genkit.models.gflownet.env`, registry :data:`ENVIRONMENTS`: ``hypergrid``, ``bitseq``,
``sequence_design``), the policy networks, vectorised rollouts, the FM / DB / TB / SubTB losses, a replay buffer,
exact evaluation on enumerable environments, and the ``gflownet`` model family.
"""

from __future__ import annotations

from . import exact
from .bitseq import BitSequence
from .env import ENVIRONMENTS, Environment, check_linear_reward, get_env
from .exact import (
    empirical_distribution,
    exact_log_z,
    forward_log_prob_table,
    jsd,
    l1,
    modes_found,
    terminal_distribution,
    true_distribution,
)
from .family import GFlowNet
from .hypergrid import HyperGrid
from .losses import (
    LOSSES,
    WEIGHTINGS,
    detailed_balance,
    flow_matching,
    node_log_flows,
    subtrajectory_balance,
    trajectory_balance,
)
from .policy import Policy, PolicyOutput
from .replay import ReplayBuffer
from .sequence_design import SequenceDesign
from .trajectories import Scores, Trajectories, sample_trajectories, score_trajectories

__all__ = ["ENVIRONMENTS", "Environment", "get_env", "check_linear_reward", "HyperGrid", "BitSequence",
           "SequenceDesign", "Policy", "PolicyOutput", "Trajectories", "Scores", "sample_trajectories",
           "score_trajectories", "LOSSES", "WEIGHTINGS", "trajectory_balance", "detailed_balance",
           "subtrajectory_balance", "flow_matching", "node_log_flows", "ReplayBuffer", "GFlowNet", "exact",
           "true_distribution", "exact_log_z", "terminal_distribution", "forward_log_prob_table",
           "empirical_distribution", "l1", "jsd", "modes_found"]
