"""Real image sources, the Episode type and the seeded episode sampler."""
from .episodes import Episode, EpisodeSampler, EpisodeSource, ImageSet, TaskSpec, episode_labels

__all__ = ["Episode", "EpisodeSampler", "EpisodeSource", "ImageSet", "TaskSpec", "episode_labels"]
