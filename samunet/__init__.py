"""samunet: an nnU-Net-style pipeline for SAM-based 3D medical image segmentation."""

__version__ = "0.1.0"
