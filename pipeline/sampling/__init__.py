"""Samplers for trained flow-matching models (ODE / SDE, classifier-free guidance with an interval),
and the decoded samples as images."""

from pipeline.sampling.images import image_grid, samples_to_uint8
from pipeline.sampling.samplers import class_balanced_labels, sample, sample_labels, uniform_random_labels

__all__ = ["class_balanced_labels", "image_grid", "sample", "sample_labels", "samples_to_uint8",
           "uniform_random_labels"]
