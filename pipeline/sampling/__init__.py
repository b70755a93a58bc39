"""Samplers for trained flow-matching models (ODE / SDE, classifier-free guidance with an interval)."""

from pipeline.sampling.samplers import class_balanced_labels, sample

__all__ = ["class_balanced_labels", "sample"]
