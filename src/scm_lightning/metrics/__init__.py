"""Sample-quality metrics: Fréchet distance (FID), KID, precision/recall, feature networks.

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
    accumulate_stats,
    cached_reference_stats,
    embed_images,
    frechet_distance,
    frechet_distance_from_stats,
    stats_cache_key,
)

__all__ = [
    "DigitsClassifier",
    "FeatureStats",
    "InceptionFeatures",
    "accumulate_stats",
    "build_feature_extractor",
    "cached_reference_stats",
    "embed_images",
    "frechet_distance",
    "frechet_distance_from_stats",
    "load_digits_classifier",
    "stats_cache_key",
]
