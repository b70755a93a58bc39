"""Evaluation metrics as ADM's evaluator defines them: FID / sFID (Frechet distance of Inception
statistics), Inception Score, improved precision / recall, KID (unbiased MMD^2), and ADM-layout reference batches.

Loading the Inception network (load_inception) reads its weights only when called."""

from pipeline.metrics.frechet import RunningStatistics, feature_statistics, frechet_distance
from pipeline.metrics.inception import InceptionFeatures, load_inception
from pipeline.metrics.kid import kernel_inception_distance
from pipeline.metrics.reference import Reference, load_reference, save_reference
from pipeline.metrics.scores import inception_score, precision_recall

__all__ = [
    "InceptionFeatures",
    "Reference",
    "RunningStatistics",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_inception",
    "load_reference",
    "precision_recall",
    "save_reference",
]
