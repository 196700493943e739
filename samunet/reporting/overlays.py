"""PNG overlays of predicted (and reference) label maps on image slices, for any nnU-Net data set.

One PNG per case (matplotlib, Agg), one row per chosen slice: the image, then the reference overlay (when
there is a reference), then the prediction overlay, with a legend naming dataset.json's labels.

- Images are read with nnunetv2's reader for the data set (``determine_reader_writer_from_dataset_json``:
  .nii.gz, .nrrd, .mha, .png/.bmp/.tif, ...), so a 2D image is a volume of one slice; of a multi-channel
  case the FIRST channel (``_0000``) is shown.
- Intensities: the shown channel's own 0.5-99.5 percentiles (:data:`PERCENTILES`) are black and white, for
  MRI and CT alike; ``window=(low, high)`` fixes them instead (e.g. ``(-160, 240)``, a CT soft-tissue window).
- Colours: one per label value (:func:`label_colours`), distinct for 16 classes and far beyond; the ``ignore``
  label is not coloured. Region data sets (``regions_class_order``) are named by the label each region writes.
- Slices (first axis of the reader's array; axial for NIfTI): the ``num_slices`` slices where the prediction
  and reference together have the most foreground, kept apart (:func:`choose_slices`), plus ``even_slices``
  evenly spaced ones; pixels keep the aspect ratio of the image spacing.

A PNG is written with :func:`samunet.atomic_files.write_atomically` (a temporary file next to it, flushed,
then ``os.replace``), so a full disk or a killed run never leaves a cut-off PNG (an existing one stays as it
was). :func:`write_overlays` (every command's path) is all or nothing: it refuses an output folder that holds
input files (:func:`check_output_folder`: a .png data set's label map CASE.png would be replaced by its
picture) and renames the PNGs into place only once every case was drawn. Missing files, unreadable files
and label maps on another grid than their image raise :class:`samunet.errors.DatasetError` naming the file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from samunet.atomic_files import PARTIAL_PREFIX, write_atomically
from samunet.errors import DatasetError

logger = logging.getLogger(__name__)

PERCENTILES = (0.5, 99.5)  # of the shown channel: black and white of the grey image
ALPHA = 0.5  # opacity of the label colours over the image
DEFAULT_NUM_SLICES = 3
PANEL_INCHES = 3.2  # width of one panel
DPI = 80
POOL_PALETTES = ("tab20", "tab20b", "tab20c", "Set1", "Dark2", "Paired", "Set2", "Accent")
OVERLAY_FOLDER = "overlays"  # samunet_predict --overlays: <output>/overlays; training: <fold>/validation/overlays


def label_colours(largest_label: int) -> np.ndarray:
    """RGB colours in [0, 1] for label values ``0..largest_label`` (row 0, background, is never drawn).

    matplotlib's tab10 (its grey left out: it vanishes on a grey image), then, one at a time, the colour of
    matplotlib's qualitative palettes (:data:`POOL_PALETTES`; saturated and not dark ones, so that they show
    on bright and dark images) farthest from every colour chosen before: 16 classes stay at least 0.24 apart
    (RGB in [0, 1]), 30 at least 0.14. Beyond the pool (about 40), hues spaced by the golden angle."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
    chosen = [tuple(c[:3]) for index, c in enumerate(colormaps["tab10"].colors) if index != 7]
    pool = np.array([tuple(c[:3]) for name in POOL_PALETTES for c in colormaps[name].colors], dtype=float)
    hsv = rgb_to_hsv(pool)
    pool = pool[(hsv[:, 1] > 0.5) & (hsv[:, 2] > 0.45)]
    while len(chosen) < largest_label:
        distance = np.sqrt(((pool[:, None] - np.array(chosen)[None]) ** 2).sum(-1)).min(axis=1)
        if distance.max() < 0.05:
            break
        chosen.append(tuple(pool[distance.argmax()]))
    extra = max(0, largest_label - len(chosen))
    chosen += [tuple(hsv_to_rgb(((0.61803398875 * k) % 1.0, 0.85, 0.95 if k % 2 else 0.7))) for k in range(extra)]
    return np.array([(0.0, 0.0, 0.0)] + chosen[:max(largest_label, 0)], dtype=float)


def legend_names(labels: Mapping[str, int | Sequence[int]],
                 regions_class_order: Sequence[int] | None = None) -> dict[int, str]:
    """Label value in the label map -> name, from dataset.json's ``labels`` (background and ``ignore`` left
    out); for regions, the value region k is written with (``regions_class_order[k]``)."""
    foreground = [(name, value) for name, value in labels.items() if name not in ("background", "ignore")]
    names = {}
    for index, (name, value) in enumerate(foreground):
        if isinstance(value, (list, tuple)):
            if regions_class_order is None or index >= len(regions_class_order):
                continue
            value = regions_class_order[index]
        names[int(value)] = name
    return names


def choose_slices(label_maps: Sequence[np.ndarray], num_slices: int = DEFAULT_NUM_SLICES,
                  even_slices: int = 0) -> list[tuple[int, str]]:
    """(slice index, why) for the rows of an overlay: the ``num_slices`` slices (first axis) with the most
    foreground voxels in ``label_maps`` together, at least an ``extent / (2 * num_slices)`` apart (extent: the
    foreground's slice range), then ``even_slices`` evenly spaced over the whole volume. Without any
    foreground, the middle slice stands in for the first."""
    depth = label_maps[0].shape[0]
    counts = sum((m.reshape(depth, -1) > 0).sum(axis=1) for m in label_maps)
    labelled = np.flatnonzero(counts)
    chosen: dict[int, str] = {}
    if num_slices > 0 and labelled.size:
        gap = max(1, (labelled[-1] - labelled[0] + 1) // (2 * num_slices))
        for index in sorted(labelled, key=lambda i: (-counts[i], i)):
            if len(chosen) == num_slices:
                break
            if all(abs(index - other) >= gap for other in chosen):
                chosen[int(index)] = "most foreground"
    elif num_slices > 0:
        chosen[depth // 2] = "middle, no foreground"
    for value in np.linspace(0, depth - 1, even_slices + 2)[1:-1] if even_slices > 0 else ():
        chosen.setdefault(int(round(value)), "evenly spaced")
    if not chosen:
        chosen[depth // 2] = "middle"
    return sorted(chosen.items())


def intensity_window(image: np.ndarray, window: tuple[float, float] | None = None) -> tuple[float, float]:
    """(black, white): ``window`` when given, else the image's :data:`PERCENTILES` of its finite values."""
    if window is not None:
        low, high = float(window[0]), float(window[1])
    else:
        finite = image[np.isfinite(image)]
        low, high = (float(v) for v in np.percentile(finite, PERCENTILES)) if finite.size else (0.0, 1.0)
    return low, high if high > low else low + 1.0


def blend(image_slice: np.ndarray, labels: np.ndarray | None, colours: np.ndarray, window: tuple[float, float],
          ignore_label: int | None = None, alpha: float = ALPHA) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1]: the grey image scaled to ``window``, each label value > 0 (except the
    ignore label) mixed in with its colour at opacity ``alpha``."""
    grey = np.clip((image_slice.astype(np.float64) - window[0]) / (window[1] - window[0]), 0.0, 1.0)
    grey = np.nan_to_num(grey)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if labels is not None:
        drawn = labels > 0
        if ignore_label is not None:
            drawn &= labels != ignore_label
        values = labels[drawn].astype(int)
        rgb[drawn] = (1.0 - alpha) * rgb[drawn] + alpha * colours[values]
    return rgb


def _read(reader, files: Sequence[str], what: str, segmentation: bool) -> tuple[np.ndarray, tuple]:
    for name in files:
        if not os.path.isfile(name):
            raise DatasetError(f"{what} {name} does not exist; give the folder that holds it")
    try:
        array, properties = reader.read_seg(files[0]) if segmentation else reader.read_images(list(files))
    except Exception as error:  # each reader fails its own way (SimpleITK RuntimeError, PIL, tifffile)
        raise DatasetError(f"{what} {files[0]} cannot be read ({type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no details'}); "
                           f"check the file or write it again") from error
    return np.asarray(array), tuple(float(s) for s in properties["spacing"])


def _reader_for(example_file: str, dataset_json: Mapping | None):
    """nnunetv2's reader for ``example_file`` (dataset.json's choice when given, else by file ending)."""
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         determine_reader_writer_from_file_ending)
    if not os.path.isfile(example_file):
        raise DatasetError(f"image {example_file} does not exist; give the folder that holds it")
    ending = ".nii.gz" if example_file.endswith(".nii.gz") else os.path.splitext(example_file)[1]
    try:  # nnunetv2 prints the traceback of each reader that fails to open the file: kept off the terminal
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            if dataset_json is not None:
                return determine_reader_writer_from_dataset_json(dict(dataset_json), example_file, verbose=False)()
            return determine_reader_writer_from_file_ending(ending, example_file, verbose=False)()
    except RuntimeError as error:  # nnunetv2: no reader could open the file
        raise DatasetError(f"image {example_file} cannot be read by any of nnunetv2's readers for {ending} files; "
                           f"check the file or write it again") from error


def write_overlay(image_file: str | os.PathLike | Sequence[str | os.PathLike],
                  reference_file: str | os.PathLike | None, prediction_file: str | os.PathLike,
                  output_png: str | os.PathLike, label_names: Mapping[str, int | Sequence[int]],
                  window: tuple[float, float] | None = None, num_slices: int = DEFAULT_NUM_SLICES, *,
                  even_slices: int = 0, dataset_json: Mapping | None = None, title: str | None = None) -> Path:
    """Draw one case into ``output_png`` (see the module docstring), titled ``title`` (default: the PNG's
    name without .png); returns its path.

    ``image_file``: the image, or the case's channel files (the first is shown); ``reference_file``: None
    for a prediction alone; ``label_names``: dataset.json's ``labels``; ``dataset_json``: picks the reader
    (else chosen from the file ending) and gives ``regions_class_order``. Raises :class:`DatasetError` for a
    missing or unreadable file or a label map whose shape differs from its image's; a failed write (OSError,
    e.g. ENOSPC, naming ``output_png``) leaves no partial file and an existing PNG as it was."""
    image_files = [os.fspath(image_file)] if isinstance(image_file, (str, os.PathLike)) \
        else [os.fspath(f) for f in image_file]
    reader = _reader_for(image_files[0], dataset_json)
    image, spacing = _read(reader, image_files[:1], "image", segmentation=False)
    maps = {}
    for role, name in (("reference", reference_file), ("prediction", prediction_file)):
        if name is None:
            continue
        labels, _ = _read(reader, [os.fspath(name)], role, segmentation=True)
        if labels.shape[1:] != image.shape[1:]:
            raise DatasetError(f"{role} {os.fspath(name)} has shape {labels.shape[1:]} but its image "
                               f"{image_files[0]} has {image.shape[1:]}; a label map must be on its image's grid "
                               f"(is it another case's, or resampled?)")
        maps[role] = np.rint(labels[0]).astype(np.int32)  # readers return label maps as floats
    regions = (dataset_json or {}).get("regions_class_order")
    names = legend_names(label_names, regions)
    ignore = label_names.get("ignore")
    largest = max([1, *names] + [int(m.max()) for m in maps.values()])
    colours = label_colours(largest)
    shown = image[0]
    lows_highs = intensity_window(shown, window)
    rows = choose_slices(list(maps.values()), num_slices, even_slices)
    aspect = spacing[1] / spacing[2] if len(spacing) == 3 else 1.0
    title = title if title is not None else Path(output_png).name.removesuffix(".png")
    figure = _draw(title, shown, maps, rows, colours, lows_highs, ignore if isinstance(ignore, int) else None, aspect,
                   names)
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(output_png, lambda stream: figure.savefig(stream, format="png", dpi=DPI,
                                                                   bbox_inches="tight"), suffix=".png")
    finally:
        import matplotlib.pyplot as plt
        plt.close(figure)
    return output_png


def _draw(title: str, image: np.ndarray, maps: dict[str, np.ndarray], rows: list[tuple[int, str]],
          colours: np.ndarray, window: tuple[float, float], ignore: int | None, aspect: float,
          names: dict[int, str]):
    """The matplotlib figure of :func:`write_overlay` (nearest-neighbour pixels, no axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    height, width = image.shape[1:]
    panel_height = float(np.clip(PANEL_INCHES * height * aspect / width, 1.0, 3 * PANEL_INCHES))
    columns = [("image", None)] + list(maps.items())
    figure, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                                figsize=(PANEL_INCHES * len(columns), (panel_height + 0.3) * len(rows)))
    for row, (index, why) in enumerate(rows):
        for column, (name, labels) in enumerate(columns):
            axis = axes[row][column]
            axis.imshow(blend(image[index], None if labels is None else labels[index], colours, window, ignore),
                        aspect=aspect, interpolation="nearest")
            axis.set_title(f"{name}, slice {index}" + (f" ({why})" if column == 0 and image.shape[0] > 1 else ""),
                           fontsize=8)
            axis.axis("off")
    legend = [Patch(color=colours[value], label=f"{value}: {name}") for value, name in sorted(names.items())]
    found = set().union(*(np.flatnonzero(np.bincount(m[m > 0])).tolist() for m in maps.values()))
    legend += [Patch(color=colours[value], label=f"{value}: (not in dataset.json)")
               for value in sorted(found - set(names) - {ignore}) if value > 0]
    if legend:
        figure.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=min(len(legend), 2 * len(columns)), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------------- cases of folders
@dataclass(frozen=True)
class OverlayCase:
    """One case to draw: its channel files, its prediction and (or None) its reference."""
    name: str
    images: tuple[str, ...]
    prediction: str
    reference: str | None = None


def _label_maps(folder: Path, ending: str) -> dict[str, str]:
    """Case name -> file, for the files of ``folder`` ending in ``ending`` (temporary files left out)."""
    if not folder.is_dir():
        raise DatasetError(f"folder {folder} does not exist" if not folder.exists() else
                           f"{folder} is a file; give the folder holding the {ending} label maps")
    return {entry.name[:-len(ending)]: str(entry) for entry in sorted(folder.iterdir())
            if entry.name.endswith(ending) and entry.is_file() and not entry.name.startswith((".", PARTIAL_PREFIX))}


def _first_names(names: Sequence[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def cases_from_folders(images_folder: str | os.PathLike, predictions_folder: str | os.PathLike,
                       dataset_json: Mapping, references_folder: str | os.PathLike | None = None,
                       names: Sequence[str] | None = None) -> list[OverlayCase]:
    """The cases of ``predictions_folder`` (CASE + file ending; only ``names`` when given) with their images
    (CASE_XXXX + ending in ``images_folder``, nnunetv2's naming) and references (CASE + ending).

    Raises :class:`DatasetError` (one line) for a missing folder, no predictions, or cases without images or
    without a reference, naming them."""
    from nnunetv2.utilities.utils import create_paths_fn
    ending = dataset_json["file_ending"]
    predictions = _label_maps(Path(predictions_folder), ending)
    if names is not None:
        unknown = [name for name in names if name not in predictions]
        if unknown:
            raise DatasetError(f"{predictions_folder} has no label map {unknown[0]}{ending} "
                               f"({len(unknown)} case(s) asked for are not there); give cases it holds")
        predictions = {name: predictions[name] for name in names}
    if not predictions:
        raise DatasetError(f"{predictions_folder} holds no label maps CASE{ending} to draw; give the folder "
                           f"samunet_predict wrote (or a fold's validation folder)")
    images_folder = Path(images_folder)
    if not images_folder.is_dir():
        raise DatasetError(f"image folder {images_folder} does not exist; give the folder holding "
                           f"CASE_0000{ending}")
    files = sorted(entry.name for entry in images_folder.iterdir() if entry.name.endswith(ending))
    image_lists = [create_paths_fn(str(images_folder), files, ending, name) for name in predictions]  # CASE_XXXX
    references = _label_maps(Path(references_folder), ending) if references_folder is not None else None
    no_image = [name for name, files in zip(predictions, image_lists) if not files]
    no_reference = [name for name in predictions if references is not None and name not in references]
    problems = []
    if no_image:
        problems.append(f"{len(no_image)} case(s) have no image {no_image[0]}_0000{ending} in {images_folder} "
                        f"({_first_names(no_image)})")
    if no_reference:
        problems.append(f"{len(no_reference)} case(s) have no reference {no_reference[0]}{ending} in "
                        f"{references_folder} ({_first_names(no_reference)})")
    if problems:
        raise DatasetError("; ".join(problems) + "; give the matching folders")
    return [OverlayCase(name, tuple(files), prediction, references[name] if references is not None else None)
            for (name, prediction), files in zip(predictions.items(), image_lists)]


def _folder_identity(folder: Path) -> tuple:
    """What makes two spellings of one folder equal: its device and inode when it exists (symbolic links,
    relative paths, bind mounts), else its resolved path."""
    try:
        status = folder.stat()
        return ("inode", status.st_dev, status.st_ino)
    except OSError:
        return ("path", str(folder.resolve()))


def check_output_folder(output_folder: str | os.PathLike, cases: Sequence[OverlayCase]) -> None:
    """Refuse an output folder that is a file, or that holds input files of ``cases`` (their images,
    predictions or references): ``OUT/CASE.png`` could be a label map or image of a .png data set, which the
    overlay would replace, and PNGs mixed into an input folder are read as cases later. Folders are compared
    as the file system sees them (:func:`_folder_identity`). Raises :class:`DatasetError` in one line."""
    output = Path(output_folder)
    if output.exists() and not output.is_dir():
        raise DatasetError(f"the output folder {output} is a file; choose another output folder")
    identity = _folder_identity(output)
    roles = (("images (-i)", lambda case: case.images), ("predictions (-p)", lambda case: (case.prediction,)),
             ("references (-r)", lambda case: (case.reference,) if case.reference else ()))
    for role, files in roles:
        folders = {Path(name).parent for case in cases for name in files(case)}
        for folder in sorted(folders):
            if _folder_identity(folder) == identity:
                raise DatasetError(f"the output folder {output} is the folder of the {role} {folder}; the overlays "
                                   f"CASE.png written there would overwrite or mix with its files; choose another "
                                   f"output folder")


def write_overlays(cases: Sequence[OverlayCase], output_folder: str | os.PathLike, dataset_json: Mapping, *,
                   window: tuple[float, float] | None = None, num_slices: int = DEFAULT_NUM_SLICES,
                   even_slices: int = 0) -> list[Path]:
    """``output_folder/CASE.png`` for each case (:func:`write_overlay`); returns the PNGs written.

    All or nothing: the output folder is checked first (:func:`check_output_folder`), then every case is drawn
    into a hidden staging file (``.partial_...``) and only when all were drawn are they renamed to their
    names; an unreadable input or a failed write then raises (a DatasetError saying that nothing was written)
    with no new PNG in ``output_folder`` and the PNGs already there as they were."""
    check_output_folder(output_folder, cases)
    output = Path(output_folder)
    created = not output.exists()
    staged: list[tuple[Path, Path]] = []
    try:
        for case in cases:
            target = output / f"{case.name}.png"
            staging = output / f"{PARTIAL_PREFIX}staged_{case.name}.png"
            try:
                write_overlay(case.images, case.reference, case.prediction, staging, dataset_json["labels"], window,
                              num_slices, even_slices=even_slices, dataset_json=dataset_json, title=case.name)
            except OSError as error:  # a full disk: named as the PNG it was writing, not the staging file
                if error.filename != os.fspath(staging):
                    raise
                raise OSError(error.errno, error.strerror, os.fspath(target)) from error
            staged.append((staging, target))
    except DatasetError as error:
        raise DatasetError(f"{error}; no overlay was written to {output}") from error
    finally:
        if len(staged) < len(cases):
            for staging, _ in staged:
                staging.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    output.rmdir()  # the folder this call made, left empty
    for staging, target in staged:
        os.replace(staging, target)
    written = [target for _, target in staged]
    logger.info("wrote %d overlay(s) to %s", len(written), output_folder)
    return written


def training_images(dataset_name: str, dataset_json: Mapping) -> dict[str, tuple[str, ...]]:
    """Case -> channel files of the raw training images ($nnUNet_raw/DATASET/imagesTr, or dataset.json's
    ``dataset`` entries; nnunetv2's ``get_filenames_of_train_images_and_targets``). Raises
    :class:`DatasetError` when the raw data set is not there."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    folder = Path(nnUNet_raw or "") / dataset_name
    if not nnUNet_raw or not (folder / "imagesTr").is_dir() and "dataset" not in dataset_json:
        raise DatasetError(f"--overlays draws the validation cases on their raw images, but {folder / 'imagesTr'} "
                           f"does not exist; set nnUNet_raw to the folder holding {dataset_name}, or leave out "
                           f"--overlays")
    found = get_filenames_of_train_images_and_targets(str(folder), dict(dataset_json))
    return {case: tuple(entry["images"]) for case, entry in found.items()}


def remove_validation_overlays(fold_folder: str | os.PathLike) -> list[Path]:
    """Remove the PNGs (and staging files) of ``<fold>/validation/overlays`` (the folder too, when nothing else
    is left in it): drawn from an earlier validation, they would not match the predictions a new validation
    writes. Returns the files removed."""
    folder = Path(fold_folder) / "validation" / OVERLAY_FOLDER
    if not folder.is_dir():
        return []
    removed = [entry for entry in sorted(folder.iterdir()) if entry.is_file() and entry.name.endswith(".png")]
    for entry in removed:
        entry.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()  # kept when the user put other files there
    return removed


def write_validation_overlays(fold_folder: str | os.PathLike, dataset_name: str, dataset_json: Mapping,
                              reference_folder: str | os.PathLike) -> list[Path]:
    """``<fold>/validation/overlays/CASE.png`` for every validation prediction: the raw training image
    (:func:`training_images`), the reference from ``reference_folder`` (the preprocessed data set's
    ``gt_segmentations``) and the prediction."""
    validation = Path(fold_folder) / "validation"
    ending = dataset_json["file_ending"]
    images = training_images(dataset_name, dataset_json)
    predictions = _label_maps(validation, ending)
    references = _label_maps(Path(reference_folder), ending)
    missing = [name for name in predictions if name not in images or name not in references]
    if missing:
        raise DatasetError(f"validation case(s) {', '.join(missing[:5])} have no raw image or reference in "
                           f"{dataset_name}; the raw data set differs from the one the model was trained on")
    cases = [OverlayCase(name, images[name], prediction, references[name]) for name, prediction in predictions.items()]
    return write_overlays(cases, validation / OVERLAY_FOLDER, dataset_json)


def write_prediction_overlays(input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                              dataset_json: Mapping, *, num_parts: int = 1, part_id: int = 0) -> list[Path]:
    """``samunet_predict --overlays``: ``OUTPUT/overlays/CASE.png`` for the cases this process predicted
    (nnunetv2's split: the input folder's sorted cases ``[part_id::num_parts]``), prediction alone."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    names = get_identifiers_from_splitted_dataset_folder(os.fspath(input_folder), dataset_json["file_ending"])
    predicted = _label_maps(Path(output_folder), dataset_json["file_ending"])
    names = [name for name in sorted(names)[part_id::num_parts] if name in predicted]
    if not names:
        return []
    cases = cases_from_folders(input_folder, output_folder, dataset_json, names=names)
    return write_overlays(cases, Path(output_folder) / OVERLAY_FOLDER, dataset_json)
