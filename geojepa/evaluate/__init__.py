"""Evaluation: task datasets, embeddings, probes against baselines, kNN retrieval, report."""

from geojepa.evaluate.stage import evaluate

__all__ = ["evaluate"]
