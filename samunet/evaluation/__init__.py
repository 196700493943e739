"""Evaluation of segmentations: per-class metrics and folder-level summaries."""
