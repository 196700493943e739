"""PNG overlays of reference and predicted label maps on image slices (matplotlib, Agg).

A PNG is written with :func:`samunet.atomic_files.write_atomically` (a temporary file next to it, flushed,
then ``os.replace``), so a full disk or a killed run never leaves a cut-off PNG (an existing one stays
as it was).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samunet.atomic_files import write_atomically

# one colour per label value (background transparent); wraps for more classes
LABEL_COLOURS = np.array([[0, 0, 0], [230, 75, 53], [77, 187, 213], [0, 160, 135], [243, 155, 127],
                          [132, 145, 180], [145, 209, 194], [220, 0, 0], [126, 97, 72]], dtype=float) / 255.0


def _rgba(labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    colours = LABEL_COLOURS[1 + (labels.astype(int) - 1) % (len(LABEL_COLOURS) - 1)]
    rgba = np.concatenate([colours, np.full(labels.shape + (1,), alpha)], axis=-1)
    rgba[labels == 0, 3] = 0.0
    return rgba


def representative_slices(reference: np.ndarray, count: int = 3) -> list[int]:
    """Axial slices spread over the labelled extent (or the whole volume when it is empty)."""
    labelled = np.flatnonzero(reference.reshape(reference.shape[0], -1).any(axis=1))
    low, high = (labelled[0], labelled[-1]) if labelled.size else (0, reference.shape[0] - 1)
    return sorted({int(round(v)) for v in np.linspace(low, high, count + 2)[1:-1]})


def write_overlay(image_file: str | os.PathLike, reference_file: str | os.PathLike,
                  prediction_file: str | os.PathLike, output_png: str | os.PathLike,
                  label_names: dict[str, int], window: tuple[float, float] = (-160.0, 240.0),
                  num_slices: int = 3) -> Path:
    """One row per slice: image | reference overlay | prediction overlay; returns the PNG path. A failed
    write (OSError, e.g. ENOSPC, naming ``output_png``) leaves no partial file and an existing PNG as it was."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file))).astype(np.float32)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_file)))
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_file)))
    spacing = sitk.ReadImage(str(image_file)).GetSpacing()
    aspect = spacing[1] / spacing[0]
    slices = representative_slices(reference, num_slices)
    figure, axes = plt.subplots(len(slices), 3, figsize=(9, 3 * len(slices)), squeeze=False)
    for row, index in enumerate(slices):
        for column, (title, labels) in enumerate((("image", None), ("reference", reference),
                                                  ("prediction", prediction))):
            axis = axes[row][column]
            axis.imshow(image[index], cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect)
            if labels is not None:
                axis.imshow(_rgba(labels[index]), aspect=aspect)
            axis.set_title(f"{title}, slice {index}", fontsize=9)
            axis.axis("off")
    legend = [Patch(color=LABEL_COLOURS[1 + (value - 1) % (len(LABEL_COLOURS) - 1)], label=name)
              for name, value in label_names.items() if value != 0]
    figure.legend(handles=legend, loc="lower center", ncol=max(1, len(legend)), fontsize=9)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(output_png, lambda stream: figure.savefig(stream, format="png", dpi=80), suffix=".png")
    finally:
        plt.close(figure)
    return output_png
