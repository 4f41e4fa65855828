"""The model zoo: architectures, the on-disk model format, registering checkpoints, pre-training and the
``purer-zoo`` CLI."""
from .architectures import Classifier, build_model
from .teacher import ModelConfig, Teacher, prepare_input, zoo_rule
from .store import Zoo, default_zoo_dir
from .ingest import ModelSource, read_manifest, register_models
from .pretrain import PretrainConfig, pretrain_zoo

__all__ = ["Classifier", "build_model", "ModelConfig", "Teacher", "prepare_input", "zoo_rule", "Zoo",
           "default_zoo_dir", "ModelSource", "read_manifest", "register_models", "PretrainConfig", "pretrain_zoo"]
