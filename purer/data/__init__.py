"""Real image sources, the Episode type and the seeded episode sampler."""
from .episodes import SPLITS, Episode, EpisodeSampler, EpisodeSource, ImageSet, TaskBatch, TaskSpec, episode_labels
from .sources import DATASETS, load_split

__all__ = ["Episode", "EpisodeSampler", "EpisodeSource", "ImageSet", "TaskBatch", "TaskSpec", "episode_labels", "DATASETS", "SPLITS", "load_split"]
