"""The one place where samunet checks image and label files before it uses them.

Planning (:func:`samunet.preprocessing.dataset_checks.validate_raw_dataset`) and prediction
(:func:`prediction_cases`, ``samunet_predict``'s input folder) run the same checks, so a file one
command refuses is refused by the other in the same words. Every problem found is collected as a
:class:`Problem` (which file, what is wrong) and all of them are raised together, before anything
is written, as one :class:`~samunet.errors.InputFilesError` whose one-line message groups them by
kind, each kind with how to fix it (:func:`raise_if_problems`).

- Names (:func:`files_with_ending`, :func:`channel_suffix_problems`): entries named like images that
  are no readable regular file (a broken symbolic link, a folder, a fifo: nnunetv2's listing would
  drop them without a word), image files in another format than dataset.json's ``file_ending`` (or
  the same case in two formats), image files without nnU-Net's 4-digit channel suffix
  (``CASE_0000<file_ending>``).
- Contents (:func:`inspect_case`, one call per case, run for all cases in a process pool by
  :func:`inspect_cases`): every file is read once with the nnunetv2 reader the dataset uses
  (:func:`reader_class_for`), which finds empty and unreadable files (and truncated NIfTI files,
  which SimpleITK reads without complaint, by their length); 4D images and
  multi-component pixels that nnunetv2's reader would misread; 3D images whose singleton axis is
  in-plane (2D images nnU-Net would cut into 1-pixel strips); the number of channels counted as the
  reader counts them (an RGB png is 3) against ``channel_names``; non-finite voxels; label values
  that are not whole numbers, negative, or not declared; and size, spacing, origin and direction of
  every channel and of the label against the case's first channel.
- At prediction, given the model's grid (:class:`ModelGrid`), the size each test image takes once
  resampled to the model's spacing (as nnunetv2's preprocessor computes it): an axis shrinking below
  one pixel is refused (a header in the wrong units, e.g. metres); a case growing beyond
  :data:`LARGE_CASE_FACTOR` times the model's median image size on an axis is a warning naming the
  sliding-window steps it implies (:data:`WARNING_KINDS`: logged, not raised).
"""
from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Sequence

import numpy as np

from samunet.errors import DatasetError, InputFilesError, problems_in_one_line
from samunet.image_io import GEOMETRY_FIELDS, differing_geometry_fields, nifti_truncation, read_image_header

logger = logging.getLogger(__name__)

MAX_LISTED_PER_KIND = 8
MAX_LISTED_VALUES = 6
# grids match within this absolute + relative tolerance (headers store float32)
GEOMETRY_ATOL = 1e-4
GEOMETRY_RTOL = 1e-5
# image formats nnunetv2 has no reader for; a file in one of them, next to the images, is an image in
# the wrong format (files of any other ending, e.g. a README or Tiff3DIO's spacing .json, are ignored)
OTHER_IMAGE_ENDINGS = (".nii", ".mhd", ".nhdr", ".jpg", ".jpeg", ".dcm", ".npy", ".npz")
CHANNEL_SUFFIX = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")
# a test image resampled to more than this many times the model's median image size on an axis is a
# warning: 10x per axis is 100x the work of a typical 2D case (1000x in 3D), minutes instead of seconds,
# and far beyond the sizes the model was trained on (usually a header in the wrong units, e.g. cm)
LARGE_CASE_FACTOR = 10

# kind -> (what is wrong, how to fix it); the order of first appearance orders the message
PROBLEM_KINDS: dict[str, tuple[str, str]] = {
    "dataset_json": (
        "mistakes in dataset.json",
        "correct dataset.json as nnU-Net's dataset_format.md describes: labels are the consecutive integers 0..N "
        "with background 0, regions (lists of labels) need regions_class_order with one label per region, an "
        "'ignore' label is N+1"),
    "folder": (
        "missing folders",
        "lay the dataset out in nnU-Net's raw format: imagesTr/ and labelsTr/ next to dataset.json"),
    "no_images": (
        "no images",
        "put the images there, one file per channel: CASE_0000<file_ending>, CASE_0001<file_ending> and so on"),
    "ending": (
        "image files whose ending is not dataset.json's file_ending",
        "convert them to the file_ending (nnU-Net reads only those), or move them out"),
    "duplicate": (
        "cases present twice",
        "keep one file per case and channel (in dataset.json's file_ending) and delete the other"),
    "channel_suffix": (
        "image files without nnU-Net's 4-digit channel suffix",
        "rename each to its expected name: CASE_0000<file_ending> for the first channel, CASE_0001 for the "
        "second, and so on"),
    "channels": (
        "cases with missing or extra channels",
        "give each case one image per channel of dataset.json's channel_names (CASE_0000, CASE_0001, ...), or "
        "correct channel_names"),
    "unpaired": (
        "cases without their image or label",
        "every imagesTr/CASE_XXXX needs labelsTr/CASE<file_ending> and every label its images: add the missing "
        "files or remove the strays"),
    "num_training": (
        "a wrong numTraining",
        "set numTraining in dataset.json to the number of training cases"),
    "not_a_file": (
        "entries named like images that are not readable files",
        "make each a regular, readable image file: point a broken symbolic link at an existing file (or replace "
        "it by the file), move folders and pipes out of the image folder"),
    "unreadable": (
        "files that cannot be read",
        "replace each with a complete copy (an empty or truncated file is usually an interrupted copy or "
        "download)"),
    "dimension": (
        "images with more than 3 dimensions",
        "nnU-Net reads and writes 2D and 3D images: save each 3D volume of a 4D image as its own channel file "
        "CASE_0000, CASE_0001, ... (nnUNetv2_convert_MSD_dataset does this for MSD data)"),
    "components": (
        "files with several values per pixel",
        "labels hold one value per pixel, and so do images except RGB(A) .png/.bmp/.tif read by nnunetv2's "
        "NaturalImage2DIO: save each component as its own channel file (CASE_0000, CASE_0001, ...)"),
    "singleton_axis": (
        "2D images saved as 3D volumes with their singleton axis in-plane",
        "nnU-Net's 2d configuration slices along z: save each as a 2D image (e.g. "
        "sitk.GetImageFromArray(array.squeeze())) or as a 3D volume of size (W, H, 1), i.e. numpy shape "
        "(1, H, W)"),
    "non_finite": (
        "non-finite voxels (NaN or inf)",
        "replace them with finite values (e.g. numpy.nan_to_num) and save the files again"),
    "label_not_integer": (
        "label values that are not whole numbers",
        "labels are class indices: re-save them with an integer type (after nearest-neighbour, never linear, "
        "resampling)"),
    "label_negative": (
        "negative label values",
        "labels are class indices 0..N: map them to a declared label (background 0, or an 'ignore' label)"),
    "label_undeclared": (
        "label values not declared in dataset.json",
        "declare each value in dataset.json's labels (consecutive 0..N) or correct the label files"),
    "geometry": (
        "images and labels on different grids",
        "resample the label (nearest neighbour) or the channel onto the case's first image, e.g. "
        "sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor), or correct the header"),
    "spacing_too_fine": (
        "images that would shrink below one pixel when resampled to the model's spacing",
        "check the header's units: nnU-Net takes spacing in mm (a header written in metres or micrometres is "
        "1000x off); correct the spacing (e.g. image.SetSpacing) and save the files again"),
    "large_case": (
        "images far larger than the model's cases once resampled to its spacing",
        f"expect a long run; if this is not a {LARGE_CASE_FACTOR}x larger field of view, check the header's units "
        "(nnU-Net takes spacing in mm)"),
}
# kinds that are reported as warnings and never refuse the input
WARNING_KINDS = frozenset({"large_case"})


@dataclass(frozen=True)
class ModelGrid:
    """What a trained model resamples its inputs to: the configuration's ``spacing`` (after the plans'
    ``transpose_forward``; 2 values for a 2D configuration), ``transpose_forward``, the configuration's
    ``median_image_size_in_voxels``, its ``patch_size`` and the predictor's sliding-window step
    (``tile_step_size``)."""
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    median_size: tuple[float, ...]
    patch_size: tuple[int, ...]
    tile_step_size: float


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: ``kind`` (a key of :data:`PROBLEM_KINDS`) and ``detail``
    (which file or case, and what was found there)."""
    kind: str
    detail: str


def raise_if_problems(subject: str, problems: Sequence[Problem]) -> None:
    """Raise one :class:`InputFilesError` for ``problems`` (nothing when there are none).

    The message is one line (:func:`samunet.errors.problems_in_one_line`): ``<subject> has N problem(s).``
    and then, per kind, what is wrong, the first :data:`MAX_LISTED_PER_KIND` details and how to fix it.
    """
    problems = [problem for problem in problems if problem.kind not in WARNING_KINDS]
    if not problems:
        return
    raise InputFilesError(problems_in_one_line(subject, ((p.kind, p.detail) for p in problems), PROBLEM_KINDS,
                                               max_listed=MAX_LISTED_PER_KIND), problems)


def display_name(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` (the dataset or input folder) when inside it, else in full."""
    relative = os.path.relpath(path, root)
    return str(path) if relative.startswith("..") else relative


def image_endings() -> tuple[str, ...]:
    """Every ending taken for an image file: nnunetv2's readers' own and :data:`OTHER_IMAGE_ENDINGS`,
    longest first (so ``.nii.gz`` wins over ``.gz``)."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
    endings = {e.lower() for reader in LIST_OF_IO_CLASSES for e in reader.supported_file_endings}
    return tuple(sorted(endings | set(OTHER_IMAGE_ENDINGS), key=len, reverse=True))


def reader_class_for(dataset_json: dict, example_file: str | None):
    """The nnunetv2 reader class for a dataset, chosen as nnunetv2's planner chooses it
    (``determine_reader_writer_from_dataset_json`` with an example image), its console output
    silenced. An example that no reader can open falls back to the first reader of the ending (the
    per-file checks then name that file). Raises :class:`DatasetError` for an ending no reader takes."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    for example in ([example_file] if example_file is not None else []) + [None]:
        try:
            with _silenced():
                return determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)
        except RuntimeError:
            continue
    raise DatasetError(f"dataset.json's file_ending {dataset_json['file_ending']!r} has no nnunetv2 reader; use one "
                       f"of {', '.join(e for e in image_endings() if e not in OTHER_IMAGE_ENDINGS)}")


def files_with_ending(folder: Path, file_ending: str, root: Path) -> tuple[list[str], list[Problem]]:
    """The names of the files in ``folder`` ending with ``file_ending`` (sorted) and a problem for each
    other image file there: a case already present in ``file_ending`` (``duplicate``) or another
    image format (``ending``). Non-image files and sub-folders are ignored, as nnunetv2 does."""
    endings = image_endings()
    problems = []
    names = []
    for name in sorted(entry.name for entry in os.scandir(folder)):
        if not name.endswith(file_ending) and not any(name.lower().endswith(e) for e in endings):
            continue  # not an image: ignored, as nnunetv2 ignores it
        reason = not_a_readable_file(folder / name)
        if reason:
            problems.append(Problem("not_a_file", f"{display_name(folder / name, root)} {reason}"))
        else:
            names.append(name)
    matching = [name for name in names if name.endswith(file_ending)]
    stems = {name[:-len(file_ending)] for name in matching}
    for name in names:
        if name in matching:
            continue
        ending = next(e for e in endings if name.lower().endswith(e))
        stem = name[:-len(ending)]
        if stem in stems:
            problems.append(Problem("duplicate", f"{display_name(folder / name, root)} and "
                                                 f"{stem}{file_ending} are the same case"))
        else:
            problems.append(Problem("ending", f"{display_name(folder / name, root)} ends with {name[len(stem):]}, "
                                              f"dataset.json's file_ending is {file_ending}"))
    return matching, problems


def not_a_readable_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` is no regular file this process can read (a broken symbolic link, a folder, a fifo,
    socket or device, no read permission), or None when it is one."""
    try:
        mode = os.stat(path).st_mode  # follows symbolic links
    except OSError as error:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return f"cannot be opened ({error.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a fifo, socket or device)"
    if not os.access(path, os.R_OK):
        return "is not readable (no read permission)"
    return None


def channel_suffix_problems(names: Iterable[str], file_ending: str, folder: Path,
                            root: Path) -> tuple[list[Problem], set[str]]:
    """A problem for each image name without nnU-Net's channel suffix (``CASE_0000<file_ending>``),
    naming the file and the name it should have, and the set of those names.

    A name like ``case_0002.nii.gz`` reads as channel 0002 of case ``case``; when that case has no
    channel 0000 its files are more likely cases named without their suffix, and both readings are
    given."""
    names = list(names)
    parsed = {name: CHANNEL_SUFFIX.fullmatch(name[:-len(file_ending)]) for name in names}
    with_first_channel = {match["case"] for match in parsed.values() if match and match["channel"] == "0000"}
    problems, flagged = [], set()
    for name, match in parsed.items():
        if match and match["case"] in with_first_channel:
            continue
        stem = name[:-len(file_ending)]
        why = f"; or channel {match['channel']} of case {match['case']!r}, whose channel 0000 is missing" \
            if match else ""
        problems.append(Problem("channel_suffix", f"{display_name(folder / name, root)} (expected "
                                                  f"{stem}_0000{file_ending}{why})"))
        flagged.add(name)
    return problems, flagged


def inspect_case(case: str, image_files: Sequence[str], label_file: str | None, reader_class,
                 channel_names: Sequence[str], declared_labels: Collection[int] | None, root: str,
                 file_ending: str, model_grid: ModelGrid | None = None) -> list[Problem]:
    """Read one case's files with ``reader_class`` (nnunetv2's) and return what is wrong with them.

    ``channel_names``: dataset.json's, in channel order; ``declared_labels``: the label values
    dataset.json declares (None: not checked, e.g. when the declaration itself is wrong);
    ``label_file``: None for a case without label (prediction); ``model_grid``: the model a test case
    is predicted with (:func:`resampling_problems` on its first channel). Problems are named relative to
    ``root``. Runs in a worker process of :func:`inspect_cases`.
    """
    problems: list[Problem] = []
    images = [_inspect_file(path, reader_class, root, problems) for path in image_files]
    if all(image is not None for image in images):
        detail = _channel_count_problem(case, image_files, [image.channels for image in images], channel_names,
                                        file_ending)
        if detail:
            problems.append(Problem("channels", detail))
    label = None
    if label_file is not None:
        label = _inspect_file(label_file, reader_class, root, problems, declared_labels=declared_labels,
                              is_label=True)
    reference = next((image for image in images if image is not None), None)
    if reference is not None:
        for image in images[images.index(reference) + 1:]:
            if image is not None:
                _compare_grids(case, f"channel {reference.name}", reference, f"channel {image.name}", image,
                               problems)
        if label is not None:
            _compare_grids(case, f"image {reference.name}", reference, f"its label {label.name}", label, problems)
        if model_grid is not None and images[0] is not None and reference.spacing is not None:
            problems += resampling_problems(reference.name, reference.shape, reference.spacing, model_grid)
    return problems


def resampling_problems(name: str, shape: Sequence[int], spacing: Sequence[float],
                        grid: ModelGrid) -> list[Problem]:
    """What resampling an image of ``shape`` and ``spacing`` (as nnunetv2's reader returns them, before
    ``transpose_forward``) to the model's ``grid`` would do wrong, computed as nnunetv2's preprocessor
    computes the new shape: a ``spacing_too_fine`` problem when an axis would shrink below one pixel
    (nnunetv2 would fail on a zero-size array), a ``large_case`` warning when an axis would grow beyond
    :data:`LARGE_CASE_FACTOR` times the model's median image size, with the sliding-window steps implied."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    order = list(grid.transpose_forward)
    shape = [int(shape[i]) for i in order]
    spacing = [float(spacing[i]) for i in order]
    target = list(grid.spacing)
    if len(target) < len(shape):  # a 2D configuration keeps the slice axis' own spacing, as nnunetv2 does
        target = spacing[:len(shape) - len(target)] + target
    exact = [size * old / new for size, old, new in zip(shape, spacing, target)]
    shown = f"spacing {_rounded(spacing)} mm, the model's {_rounded(grid.spacing)} mm"
    if min(exact) < 1:
        return [Problem("spacing_too_fine", f"{name} ({shown}) would be {_rounded(exact)} pixels (axes in the "
                                            f"model's order)")]
    new_shape = [int(round(size)) for size in exact]
    compared = new_shape[len(new_shape) - len(grid.median_size):]
    if not any(size > LARGE_CASE_FACTOR * median for size, median in zip(compared, grid.median_size)):
        return []
    patch = list(grid.patch_size)
    windows = new_shape[len(new_shape) - len(patch):]
    steps = compute_steps_for_sliding_window([max(s, p) for s, p in zip(windows, patch)], patch,
                                             grid.tile_step_size)
    count = int(np.prod([len(axis) for axis in steps])) * int(np.prod(new_shape[:len(new_shape) - len(patch)]))
    return [Problem("large_case", f"{name} ({shown}) resamples to {new_shape} voxels, more than {LARGE_CASE_FACTOR}x "
                                  f"the model's median image size {[int(round(m)) for m in grid.median_size]}: "
                                  f"{count} sliding-window steps")]


def _rounded(values: Sequence[float]) -> list[float]:
    return [float(f"{float(v):.4g}") for v in values]


def inspect_cases(cases: Sequence[tuple[str, Sequence[str], str | None]], reader_class, channel_names: Sequence[str],
                  declared_labels: Collection[int] | None, root: str | os.PathLike, file_ending: str,
                  num_processes: int, model_grid: ModelGrid | None = None) -> list[Problem]:
    """:func:`inspect_case` for each (case, image files, label file or None), in a pool of
    ``num_processes`` spawned processes (in this process when it is 1 or less, or for one case)."""
    tasks = [(case, list(images), label, reader_class, list(channel_names), declared_labels, str(root), file_ending,
              model_grid) for case, images, label in cases]
    if num_processes <= 1 or len(tasks) <= 1:
        results = [inspect_case(*task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
            results = pool.starmap(inspect_case, tasks, chunksize=1)
    return [problem for result in results for problem in result]


def channel_names_of(dataset_json: dict) -> list[str]:
    """dataset.json's channel names in channel order (``channel_names``, or the older ``modality``)."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return [str(channels[key]) for key in sorted(channels, key=lambda k: int(k) if str(k).isdigit() else k)]


def prediction_cases(folder: str | os.PathLike, dataset_json: dict, *, reader_class=None,
                     num_processes: int = 0, model_grid: ModelGrid | None = None) -> list[list[str]]:
    """The cases of a prediction input folder, each the list of its channel files (nnunetv2's
    ``create_lists_from_splitted_dataset_folder``), after checking every file.

    ``dataset_json``: the model's; ``reader_class``: the model's reader (its plans'
    ``image_reader_writer``; default chosen from dataset.json as the planner does);
    ``num_processes``: processes reading the files (<= 1: this process); ``model_grid``: the model's
    (:func:`resampling_problems`; warnings are logged). Raises :class:`DatasetError` for a missing
    folder or a file given as the folder and :class:`InputFilesError` listing every problem: no images,
    entries that are no readable file, other endings, missing channel suffixes, missing or extra
    channels, and everything :func:`inspect_case` finds in the images.
    """
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise DatasetError(f"input {folder} is a file, not a folder: -i takes the folder holding the images "
                               f"(CASE_0000{dataset_json['file_ending']}, ...); give its folder {folder.parent}")
        raise DatasetError(f"input folder {folder} does not exist")
    ending = dataset_json["file_ending"]
    names, problems = files_with_ending(folder, ending, folder)
    suffix_problems, misnamed = channel_suffix_problems(names, ending, folder, folder)
    problems += suffix_problems
    cases = [files for files in create_lists_from_splitted_dataset_folder(str(folder), ending,
                                                                           num_processes=max(1, num_processes))
             if files and not any(os.path.basename(f) in misnamed for f in files)]
    if not cases and not problems:
        problems.append(Problem("no_images", f"{folder} holds no images named CASE_0000{ending}"))
    if cases:
        if reader_class is None:
            reader_class = reader_class_for(dataset_json, cases[0][0])
        tasks = [(os.path.basename(files[0])[:-len(ending) - 5], files, None) for files in cases]
        problems += inspect_cases(tasks, reader_class, channel_names_of(dataset_json), None, folder, ending,
                                  num_processes, model_grid)
    for problem in problems:
        if problem.kind in WARNING_KINDS:
            what, advice = PROBLEM_KINDS[problem.kind]
            logger.warning("%s: %s; %s", what[0].upper() + what[1:], problem.detail, advice)
    raise_if_problems(f"input folder {folder}", problems)
    return cases


@dataclass
class _FileFacts:
    name: str                       # as shown in messages
    channels: int                   # as nnunetv2's reader counts them
    shape: tuple[int, ...]          # of the reader's array, without the channel axis
    header: tuple | None            # (size, spacing, origin, direction), None when SimpleITK cannot read it
    spacing: tuple[float, ...] | None = None  # as the reader returns it (its axis order), None when not given


@contextlib.contextmanager
def _silenced():
    """nnunetv2's readers print warnings and tracebacks; the checks report in their own words."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _short_error(error: BaseException) -> str:
    """The informative line of an exception (SimpleITK's are many lines long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((line for line in reversed(lines) if "ERROR" in line), lines[0] if lines else "")
    line = line.split("ERROR: ", 1)[-1]
    text = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _inspect_file(path: str, reader_class, root: str, problems: list[Problem], *,
                  declared_labels: Collection[int] | None = None, is_label: bool = False) -> _FileFacts | None:
    """Check one file, appending to ``problems``; its facts, or None when its voxels could not be used."""
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    name = display_name(path, root)
    try:
        if os.path.getsize(path) == 0:
            problems.append(Problem("unreadable", f"{name} is empty (0 bytes)"))
            return None
    except OSError as error:
        problems.append(Problem("unreadable", f"{name}: {_short_error(error)}"))
        return None
    try:
        header = read_image_header(path)
    except RuntimeError:
        header = None  # the reader may still open it (nibabel reads NIfTI that SimpleITK refuses)
    if header is not None:
        size = tuple(header.size)
        if len(size) > 3:
            problems.append(Problem("dimension", f"{name} is {len(size)}D (size {list(size)})"))
            return None
        natural = issubclass(reader_class, NaturalImage2DIO) and not is_label
        if header.components > 1 and not (natural and header.components in (3, 4)):
            reads = "1, 3 (RGB) or 4 (RGBA)" if natural else "1"
            problems.append(Problem("components", f"{name} has {header.components} values per pixel "
                                                  f"({reader_class.__name__} {'reads' if natural else 'needs'} "
                                                  f"{reads})"))
            return None
        if len(size) == 3 and 1 in size[:2]:
            problems.append(Problem("singleton_axis", f"{name} has size {list(size)} (x, y, z): {size[2]} slices "
                                                      f"of {size[1]}x{size[0]} pixels"))
            return None
    lacking = nifti_truncation(path) if path.lower().endswith((".nii", ".nii.gz")) else None
    if lacking:
        problems.append(Problem("unreadable", f"{name} is truncated: {lacking} missing"))
        return None
    try:
        with _silenced():
            reader = reader_class()
            array, properties = reader.read_seg(path) if is_label else reader.read_images((path,))
    except Exception as error:  # any failure of a reader means the file cannot be used
        reason = _short_error(error).replace(str(path), name)
        problems.append(Problem("unreadable", f"{name} ({reader_class.__name__}: {reason})"))
        return None
    non_finite = array.size - int(np.count_nonzero(np.isfinite(array)))
    if non_finite:
        problems.append(Problem("non_finite", f"{name} has {non_finite} of {array.size}"))
    if is_label:
        _check_label_values(name, array, declared_labels, problems)
    spacing = properties.get("spacing") if isinstance(properties, dict) else None
    return _FileFacts(name, int(array.shape[0]), tuple(array.shape[1:]),
                      tuple(header[:4]) if header is not None else None,
                      tuple(float(s) for s in spacing) if spacing is not None else None)


def _check_label_values(name: str, array: np.ndarray, declared: Collection[int] | None,
                        problems: list[Problem]) -> None:
    import pandas as pd
    values = pd.unique(array.ravel())
    values = np.sort(values[np.isfinite(values)])
    fractional = values[values != np.round(values)]
    if fractional.size:
        problems.append(Problem("label_not_integer", f"{name} has {_listed(fractional)}"))
    whole = values[values == np.round(values)].astype(np.int64)
    negative = whole[whole < 0]
    if negative.size:
        problems.append(Problem("label_negative", f"{name} has {_listed(negative)}"))
    if declared is not None:
        undeclared = [int(v) for v in whole if v >= 0 and int(v) not in declared]
        if undeclared:
            problems.append(Problem("label_undeclared", f"{name} has {_listed(undeclared)} (dataset.json declares "
                                                        f"{_value_range(declared)})"))


def _value_range(values: Collection[int]) -> str:
    """``0..4`` for consecutive values, else the values listed."""
    values = sorted(values)
    return f"{values[0]}..{values[-1]}" if values == list(range(values[0], values[-1] + 1)) else _listed(values)


def _listed(values) -> str:
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    shown = ", ".join(str(round(v, 4) if isinstance(v, float) else v) for v in values[:MAX_LISTED_VALUES])
    return shown + (f" and {len(values) - MAX_LISTED_VALUES} more" if len(values) > MAX_LISTED_VALUES else "")


def _channel_count_problem(case: str, files: Sequence[str], channels: Sequence[int], channel_names: Sequence[str],
                           file_ending: str) -> str | None:
    """How the case's channels differ from dataset.json's ``channel_names``, or None when they match.

    With one channel per file (the usual layout) the channel suffixes must be 0000..N-1; a file that
    holds several channels (RGB png) counts as that many, as nnunetv2's reader counts it."""
    expected = len(channel_names)
    named = ", ".join(f"{i:04d} {n}" for i, n in enumerate(channel_names))
    suffixes = [_channel_suffix(f, file_ending) for f in files]
    if all(c == 1 for c in channels) and None not in suffixes:
        wanted = [f"{i:04d}" for i in range(expected)]
        missing = [f"{case}_{s}{file_ending}" for s in wanted if s not in suffixes]
        extra = [f"{case}_{s}{file_ending}" for s in suffixes if s not in wanted]
        if not missing and not extra:
            return None
        found = f"channel{'s' if len(suffixes) != 1 else ''} {','.join(suffixes)}"
        what = [f"{', '.join(missing)} missing"] if missing else []
        what += [f"{', '.join(extra)} extra (if {extra[0]} is a case of its own, name it "
                 f"{extra[0][:-len(file_ending)]}_0000{file_ending})"] if extra else []
        return f"{case} has {found} but dataset.json names {expected} ({named}): {' and '.join(what)}"
    if sum(channels) == expected:
        return None
    held = ", ".join(f"{s or os.path.basename(f)} holds {c}" for s, f, c in zip(suffixes, files, channels))
    return f"{case} has {sum(channels)} channel(s) ({held}) but dataset.json names {expected} ({named})"


def _channel_suffix(path: str, file_ending: str) -> str | None:
    name = os.path.basename(path)
    match = CHANNEL_SUFFIX.fullmatch(name[:-len(file_ending)]) if name.endswith(file_ending) else None
    return match["channel"] if match else None


def _compare_grids(case: str, what_a: str, a: _FileFacts, what_b: str, b: _FileFacts,
                   problems: list[Problem]) -> None:
    """A ``geometry`` problem naming every field (size, spacing, origin, direction) in which ``b``
    differs from ``a``, with both values."""
    if a.header is not None and b.header is not None:
        fields = differing_geometry_fields(a.header, b.header, atol=GEOMETRY_ATOL, rtol=GEOMETRY_RTOL)
        values = {field: (a.header[GEOMETRY_FIELDS.index(field)], b.header[GEOMETRY_FIELDS.index(field)])
                  for field in fields}
    else:  # compare what the reader returned
        values = {"size": (a.shape, b.shape)} if a.shape != b.shape else {}
    if values:
        shown = " and ".join(f"{field} ({_values(field, x)} vs {_values(field, y)})"
                             for field, (x, y) in values.items())
        problems.append(Problem("geometry", f"case {case}: {what_a} does not match {what_b} in {shown}"))


def _values(field: str, values: Sequence[float]) -> list:
    return [int(v) for v in values] if field == "size" else [round(float(v), 4) + 0.0 for v in values]
