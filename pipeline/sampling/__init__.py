"""Samplers for trained flow-matching models (ODE / SDE, classifier-free guidance with an interval)."""

from pipeline.sampling.samplers import class_balanced_labels, sample, sample_labels, uniform_random_labels

__all__ = ["class_balanced_labels", "sample", "sample_labels", "uniform_random_labels"]
