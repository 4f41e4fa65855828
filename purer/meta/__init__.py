"""Meta-learners behind one interface (MAML, ANIL, ProtoNet), their initialisations and the meta-training loop."""
from ..batchnorm import batch_stats_only
from .base import InputSpec, MetaLearner
from .init import average_teachers, from_model, random_model, with_new_head
from .maml import ANIL, MAML, MAMLConfig
from .protonet import ProtoNet, neg_sq_distances, prototypes
from .train import MetaTrainConfig, TrainHistory, meta_step, meta_train, real_episodes

__all__ = ["InputSpec", "MetaLearner", "batch_stats_only", "average_teachers", "from_model",
           "random_model", "with_new_head", "ANIL", "MAML", "MAMLConfig", "ProtoNet",
           "neg_sq_distances", "prototypes", "MetaTrainConfig", "TrainHistory", "meta_step", "meta_train",
           "real_episodes"]
