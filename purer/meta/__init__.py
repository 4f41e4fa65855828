"""Meta-learners behind one interface, their initialisations and the meta-training loop.

MAML (first/second order) and its task-adaptive family (L2F, ALFA, MeTAL, TAO), ANIL, ProtoNet, Matching
Networks, Relation Networks, meta-transfer learning (MTL) and E3BM; MTL's hard-task meta-batch as a sampler.
"""
from ..batchnorm import batch_stats_only
from .base import InputSpec, MetaLearner, slow_vmap_operators
from .e3bm import E3BM, E3BMConfig
from .hard_tasks import HardTasks, failure_labels
from .init import average_teachers, from_model, random_model, with_new_head
from .maml import ANIL, MAML, MAMLConfig
from .matching import MatchingConfig, MatchingNetwork
from .mtl import MTL, MTLConfig
from .protonet import ProtoNet, neg_sq_distances, prototypes
from .relation import RelationConfig, RelationNetwork
from .task_adaptive import TaskAdaptiveConfig, TaskAdaptiveMAML
from .train import MetaTrainConfig, TrainHistory, WeightAverage, meta_step, meta_train, real_episodes, set_outer_lr

__all__ = ["InputSpec", "MetaLearner", "slow_vmap_operators", "batch_stats_only", "average_teachers", "from_model",
           "random_model", "with_new_head", "ANIL", "MAML", "MAMLConfig", "ProtoNet",
           "neg_sq_distances", "prototypes", "MetaTrainConfig", "TrainHistory", "meta_step", "meta_train",
           "real_episodes", "WeightAverage", "set_outer_lr", "E3BM", "E3BMConfig", "HardTasks", "failure_labels",
           "MatchingConfig", "MatchingNetwork", "MTL", "MTLConfig", "RelationConfig", "RelationNetwork",
           "TaskAdaptiveConfig", "TaskAdaptiveMAML"]
