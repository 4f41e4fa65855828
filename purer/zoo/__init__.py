"""The model zoo: architectures, the on-disk model format, pre-training and the ``purer-zoo`` CLI."""
from .architectures import Classifier, build_model
from .teacher import ModelConfig, Teacher, prepare_input

__all__ = ["Classifier", "build_model", "ModelConfig", "Teacher", "prepare_input"]
