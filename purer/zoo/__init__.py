"""The model zoo: architectures, the on-disk model format, pre-training and the ``purer-zoo`` CLI."""
from .architectures import Classifier, build_model
from .teacher import ModelConfig, Teacher, prepare_input
from .store import Zoo, default_zoo_dir
from .pretrain import PretrainConfig, pretrain_zoo

__all__ = ["Classifier", "build_model", "ModelConfig", "Teacher", "prepare_input", "Zoo", "default_zoo_dir",
           "PretrainConfig", "pretrain_zoo"]
