"""Inference helpers built on nnunetv2's predictor."""
