"""Classifiers the trainer fits: the project's ResNets, torchvision and timm networks; the registry."""

from oal_trainer.models.library import STEMS, TORCHVISION_MODELS, LibraryModel
from oal_trainer.models.projector import OutlierProjector, count_parameters
from oal_trainer.models.registry import MODEL_ALIASES, MODEL_NAMES, build_model, is_library_model
from oal_trainer.models.resnets import RESNET_SPECS, BasicBlock, ResNet, ResNetSpec

__all__ = [
    "MODEL_ALIASES",
    "MODEL_NAMES",
    "RESNET_SPECS",
    "STEMS",
    "TORCHVISION_MODELS",
    "BasicBlock",
    "LibraryModel",
    "OutlierProjector",
    "ResNet",
    "ResNetSpec",
    "build_model",
    "count_parameters",
    "is_library_model",
]
