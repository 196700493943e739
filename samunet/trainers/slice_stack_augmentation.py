"""nnU-Net's training augmentation for D-slice stacks, kept in-plane.

A slice-stack trainer (Self-Prompt-SAM) trains on (D, S, S) patches in nnU-Net's "dummy 2D" mode: the
spatial transform and the low-resolution simulation already leave the slice axis alone. nnU-Net's
Gaussian blur does not: it blurs every spatial axis with a kernel of up to 7 taps (sigma 1, truncated at
6 sigma), padded by reflection, which fails for stacks of 3 slices or fewer (``padding (3, 3) at
dimension 1``) and mixes neighbouring slices in thicker ones. nnU-Net's own 3d patches are never that
thin, so its pipeline never meets the case.

:func:`in_plane_training_transforms` takes nnU-Net's transforms and swaps the blur for
:class:`InPlaneGaussianBlurTransform`: the same sigmas, probabilities and per-channel choices
(batchgeneratorsv2's sampling and ``blur_dimension``), applied to the two in-plane axes only.
"""
from __future__ import annotations

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform, blur_dimension
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform


class InPlaneGaussianBlurTransform(GaussianBlurTransform):
    """batchgeneratorsv2's :class:`GaussianBlurTransform` on the last two axes of a (C, D, H, W) image:
    every slice of a channel gets the same in-plane blur; the slice axis is never blurred. Parameters are
    sampled by the parent (one sigma per axis; the slice axis's is drawn and ignored)."""

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        channels = np.where(params["apply_to_channel"])[0]
        for j, channel in enumerate(channels):
            sigmas = params["sigmas"] if self.synchronize_channels else params["sigmas"][j]
            blurred = img[channel:channel + 1]
            for axis in range(img.ndim - 3, img.ndim - 1):  # H and W (blur_dimension counts spatial axes)
                blurred = blur_dimension(blurred, sigmas[axis], axis)
            img[channel:channel + 1] = blurred
        return img


def in_plane_training_transforms(transforms: BasicTransform) -> BasicTransform:
    """``transforms`` (nnU-Net's ``get_training_transforms``) with every Gaussian blur replaced, in place, by
    an :class:`InPlaneGaussianBlurTransform` with the same settings; returns ``transforms``."""
    children = transforms.transforms if isinstance(transforms, ComposeTransforms) else [transforms]
    for child in children:
        if isinstance(child, RandomTransform) and type(child.transform) is GaussianBlurTransform:
            blur = child.transform
            child.transform = InPlaneGaussianBlurTransform(
                blur_sigma=blur.blur_sigma, synchronize_channels=blur.synchronize_channels,
                synchronize_axes=blur.synchronize_axes, p_per_channel=blur.p_per_channel)
        elif isinstance(child, ComposeTransforms):
            in_plane_training_transforms(child)
    return transforms
