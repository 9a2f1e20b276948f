"""Sample-quality metrics: Fréchet distance (FID) and the feature networks it runs on.

Pure layer: imports neither Lightning nor Hydra.
"""

from scm_lightning.metrics.features import (
    DigitsClassifier,
    InceptionFeatures,
    build_feature_extractor,
    load_digits_classifier,
)
from scm_lightning.metrics.frechet import (
    FeatureStats,
    cached_reference_stats,
    frechet_distance,
    frechet_distance_from_stats,
    stats_cache_key,
)

__all__ = [
    "DigitsClassifier",
    "FeatureStats",
    "InceptionFeatures",
    "build_feature_extractor",
    "cached_reference_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "load_digits_classifier",
    "stats_cache_key",
]
