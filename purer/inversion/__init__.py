"""Episode inversion: BN-statistics hooks, image priors, the pseudo-image bank, the synthesizer
(:class:`EpisodeInversion`, or :class:`GeneratorInversion`) and the curriculum (:class:`GradientSwitch`)."""
from .augment import RandomAffineAugment
from .bank import PseudoBank
from .curriculum import GradientSwitch, SwitchConfig
from .grid import image_grid, save_bank_grid, save_episode_grid, save_image
from .hooks import BNStatsHook, bn_distance
from .priors import L2Prior, TotalVariation, l2_prior, total_variation
from .generator import ConditionalGenerator, GeneratorInversion, build_synthesizer
from .synthesizer import EpisodeInversion, GeneratorConfig, InversionConfig, build_augmentation

__all__ = ["RandomAffineAugment", "PseudoBank", "GradientSwitch", "SwitchConfig", "image_grid", "save_bank_grid", "save_episode_grid",
           "save_image", "BNStatsHook", "bn_distance", "L2Prior", "TotalVariation", "l2_prior", "total_variation",
           "EpisodeInversion", "InversionConfig", "build_augmentation", "ConditionalGenerator", "GeneratorConfig",
           "GeneratorInversion", "build_synthesizer"]
