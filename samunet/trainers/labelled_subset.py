"""Few labels: train on a seeded fraction of a fold's training slices or cases (``--labelled-fraction``).

H-SAM's few-shot setting (its appendix and its code's ``preprocess/make_list.py``): of all 2D slices of
the training volumes pooled together, ``int(F * N)`` are drawn uniformly at random without replacement
(Synapse: 221 of 2212 slices for F = 0.1); the other slices are not used at all (no semi-supervision).
Here the same draw is made over the slices of the fold's training cases, along the axis nnU-Net's 2d
configuration cuts the preprocessed volume into slices (axis 0, after ``transpose_forward``).

Hyper-parameters (recorded in ``samunet_settings.json`` and every checkpoint, so ``--c`` uses them):
- ``labelled_fraction`` F, 0 < F <= 1 (1: everything, nnU-Net's behaviour, nothing is written);
- ``labelled_unit``: ``slices`` (default, H-SAM's setting) or ``cases`` (whole training cases: H-SAM's LA /
  PROMISE12 settings, and the usual semi-supervised protocols);
- ``labelled_seed``: the seed of the draw (default 0); another fold draws from its own training cases.

Rounding: ``max(1, floor(F * N))`` of the N slices (or cases), as H-SAM's ``int(N * F)``, never none.

The draw is written next to nnU-Net's ``splits_final.json`` (``nnUNet_preprocessed/<dataset>/``) as
``labelled_subset_fold<fold>_cases_<F>_seed<seed>.json`` or, for slices, whose count depends on the
preprocessed data, ``labelled_subset_<data identifier>_fold<fold>_slices_<F>_seed<seed>.json``, atomically;
a file already there is used as it is (a rerun and ``--c`` train on the same subset, and a user may hand-edit
it to train on a subset of their own), after checking that it was drawn from the same training cases (and
slice counts).

How the slices reach nnU-Net's 2d data loader, which picks a case and then a slice of it: each training
case is served as a view that holds only its labelled slices (:class:`LabelledSlicesDataset`), with its
foreground locations (``class_locations``, for nnU-Net's foreground oversampling) restricted to them, and a
case without a labelled slice is left out; an unlabelled slice is therefore never loaded, so it never
reaches a loss. Slice-stack trainers (Self-Prompt-SAM's D adjacent slices) would see unlabelled neighbours,
so they take ``cases`` only. The validation cases stay the fold's full validation set.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from samunet.atomic_files import write_json_atomically
from samunet.errors import ConfigurationError

logger = logging.getLogger(__name__)

LABELLED_SUBSET_HYPERPARAMETERS = ("labelled_fraction", "labelled_unit", "labelled_seed")
UNITS = ("slices", "cases")
DEFAULT_UNIT = "slices"
DEFAULT_SEED = 0
FORMAT = 1


def check_labelled_options(hyperparameters: dict, *, uses_slice_stacks: bool = False) -> None:
    """Refuse a ``labelled_fraction`` outside (0, 1], an unknown ``labelled_unit``, a seed that is not a
    non-negative integer, or slices for a slice-stack trainer, with a ConfigurationError saying how to fix it."""
    fraction = hyperparameters.get("labelled_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                                     and math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigurationError(f"--labelled-fraction must be a number in (0, 1] (e.g. 0.1 for 10%), got "
                                 f"{fraction!r}")
    unit = hyperparameters.get("labelled_unit", DEFAULT_UNIT)
    if unit not in UNITS:
        raise ConfigurationError(f"--labelled-unit must be one of {', '.join(UNITS)}, got {unit!r}")
    seed = hyperparameters.get("labelled_seed", DEFAULT_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigurationError(f"--labelled-seed must be a non-negative integer, got {seed!r}")
    if uses_slice_stacks and unit == "slices" and fraction is not None and fraction < 1:
        raise ConfigurationError("--labelled-unit slices cannot be used with a slice-stack trainer (its stacks "
                                 "would hold unlabelled neighbouring slices); use --labelled-unit cases")


def check_labelled_options_given(given: dict) -> None:
    """Refuse ``labelled_unit`` / ``labelled_seed`` given without ``labelled_fraction`` (the options of one
    command line): they would change nothing, and a user typing ``--labelled-unit cases`` would get a run on
    all the data. ConfigurationError in one line."""
    alone = [f"--labelled-{name.removeprefix('labelled_')}" for name in ("labelled_unit", "labelled_seed")
             if given.get(name) is not None]
    if alone and given.get("labelled_fraction") is None:
        raise ConfigurationError(f"{'/'.join(alone)} need(s) --labelled-fraction F (e.g. --labelled-fraction 0.1); "
                                 f"without it every training slice is used and {' and '.join(alone)} do(es) nothing")


def describe_labelled(hyperparameters: dict) -> str:
    """The labelled subset the hyper-parameters ask for, in the words of the command line."""
    fraction = hyperparameters.get("labelled_fraction")
    if fraction is None or fraction >= 1:
        return "all of the fold's training data (no --labelled-fraction)"
    return (f"--labelled-fraction {fraction:g} ({hyperparameters.get('labelled_unit', DEFAULT_UNIT)}, seed "
            f"{hyperparameters.get('labelled_seed', DEFAULT_SEED)})")


def check_continued_labelled_subset(recorded: dict, given: dict, source: str) -> None:
    """``--c``: refuse ``labelled_*`` options ``given`` that ask for another subset than the one the run
    ``recorded`` (in ``source``) trains on; switching subsets mid-run would leave the run's reported setting
    wrong. Giving the recorded values again is accepted. ConfigurationError in one line."""
    asked = {name: given[name] for name in LABELLED_SUBSET_HYPERPARAMETERS if given.get(name) is not None}
    if not asked or describe_labelled(recorded) == describe_labelled({**recorded, **asked}):
        return
    options = " ".join(f"--labelled-{name.removeprefix('labelled_')} {value}" for name, value in asked.items())
    raise ConfigurationError(f"the run in {source} was trained with {describe_labelled(recorded)}; --c continues "
                             f"with it: leave out {options}, or train {options} as a new run (without --c, in "
                             f"another output folder: another nnUNet_results, or move this fold folder away)")


def number_to_label(fraction: float, total: int) -> int:
    """``max(1, floor(fraction * total))`` (H-SAM's ``int(total * fraction)``, never none); a product a rounding
    error below an integer (0.7 * 10 = 6.999...) counts as that integer."""
    if total < 1:
        raise ConfigurationError("there is nothing to draw labelled slices or cases from: the fold has no "
                                 "training cases")
    return max(1, min(total, math.floor(fraction * total + 1e-9)))


def draw_cases(cases: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The labelled cases: :func:`number_to_label` of ``cases`` drawn uniformly without replacement with
    ``seed`` (independent of the order ``cases`` come in); sorted."""
    pool = sorted(cases)
    chosen = np.random.default_rng(seed).choice(len(pool), number_to_label(fraction, len(pool)), replace=False)
    return sorted(pool[i] for i in chosen)


def draw_slices(slices_per_case: dict[str, int], fraction: float, seed: int) -> dict[str, list[int]]:
    """The labelled slices, ``{case: sorted slice indices}`` (cases without one left out): :func:`number_to_label`
    of all slices of all cases pooled, drawn uniformly without replacement with ``seed``."""
    pool = [(case, index) for case in sorted(slices_per_case) for index in range(int(slices_per_case[case]))]
    chosen = np.random.default_rng(seed).choice(len(pool), number_to_label(fraction, len(pool)), replace=False)
    labelled: dict[str, list[int]] = {}
    for case, index in sorted(pool[i] for i in chosen):
        labelled.setdefault(case, []).append(index)
    return labelled


def subset_file(folder: str | os.PathLike, *, fold: int | str, unit: str, fraction: float, seed: int,
                data_identifier: str) -> Path:
    """Where the subset of one fold is kept: next to ``splits_final.json`` in ``folder``."""
    name = (f"fold{fold}_cases" if unit == "cases" else f"{data_identifier}_fold{fold}_slices")
    return Path(folder) / f"labelled_subset_{name}_{fraction:g}_seed{seed}.json"


class SlicesView:
    """A (C, Z, Y, X) array (numpy, memory-mapped or blosc2) seen through the slices ``kept`` of axis 1 only:
    what nnU-Net's data loader crops from reads those slices and nothing else."""

    def __init__(self, array: Any, kept: Sequence[int]) -> None:
        self.array = array
        self.kept = np.asarray(kept, dtype=np.int64)
        self.shape = (array.shape[0], len(self.kept), *array.shape[2:])
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1:]
        key = key + (slice(None),) * (self.ndim - len(key))
        channels, depth, *rest = key
        picked = self.kept[depth]
        if np.ndim(picked) == 0:
            return np.asarray(self.array[(channels, int(picked), *rest)])
        if len(picked) == 0:
            return np.asarray(self.array[(channels, slice(0, 0), *rest)])
        if np.all(np.diff(picked) == 1):  # a run of neighbouring slices: one read
            return np.asarray(self.array[(channels, slice(int(picked[0]), int(picked[-1]) + 1), *rest)])
        return np.concatenate([np.asarray(self.array[(channels, slice(int(z), int(z) + 1), *rest)])
                               for z in picked], axis=1)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype)


def restrict_class_locations(locations: dict, kept: Sequence[int]) -> dict:
    """nnU-Net's ``class_locations`` ((n, 4) arrays of (channel, z, y, x) per class) of the slices ``kept``,
    with z renumbered to the position among them."""
    renumber = {int(z): position for position, z in enumerate(kept)}
    restricted = {}
    for key, voxels in locations.items():
        voxels = np.asarray(voxels)
        if len(voxels) == 0:
            restricted[key] = voxels
            continue
        inside = np.isin(voxels[:, 1], list(renumber))
        voxels = voxels[inside].copy()
        voxels[:, 1] = [renumber[int(z)] for z in voxels[:, 1]]
        restricted[key] = voxels
    return restricted


class LabelledSlicesDataset:
    """nnU-Net's training dataset (``identifiers``, ``load_case``) restricted to the labelled slices
    ``{case: slice indices}``: each case is served as :class:`SlicesView` of them; cases without one are left
    out. Top-level and made of plain data, so nnU-Net's data-augmentation workers can receive it."""

    def __init__(self, dataset: Any, labelled: dict[str, list[int]]) -> None:
        self.dataset = dataset
        self.labelled = {case: sorted(int(z) for z in slices) for case, slices in labelled.items() if slices}
        self.identifiers = [case for case in dataset.identifiers if case in self.labelled]

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        kept = self.labelled[identifier]
        properties = dict(properties)
        if properties.get("class_locations") is not None:
            properties["class_locations"] = restrict_class_locations(properties["class_locations"], kept)
        return (SlicesView(data, kept), SlicesView(seg, kept),
                SlicesView(seg_prev, kept) if seg_prev is not None else None, properties)


def _slices_per_case(dataset: Any) -> dict[str, int]:
    return {case: int(dataset.load_case(case)[1].shape[1]) for case in dataset.identifiers}


def _read_subset(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict):
            raise ValueError("not a JSON object")
        return content
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigurationError(f"{path} cannot be read ({type(error).__name__}: {error}); delete it to draw the "
                                 f"labelled subset again") from error


EDIT_OR_DELETE = "correct the entry (the file may be edited) or delete the file to draw the subset again"


def _listed(names: Sequence[str], count: int = 8) -> str:
    return ", ".join(names[:count]) + (f", ... ({len(names)} in all)" if len(names) > count else "")


def _wrong_case(path: Path, key: str, case: Any, training_cases: list[str], fold: int | str,
                validation_cases: Sequence[str]) -> str:
    """The one-line message for an entry of ``key`` that is not a training case of the fold."""
    why = " (it is a validation case of the fold)" if case in validation_cases else ""
    return (f"{path}: {key} names {case!r}, which is not a training case of fold {fold}{why}; the training cases "
            f"are {_listed(training_cases)}; {EDIT_OR_DELETE}")


def _check_subset(content: dict, path: Path, training_cases: list[str], unit: str,
                  slices_per_case: dict[str, int] | None, fold: int | str = "?",
                  validation_cases: Sequence[str] = ()) -> None:
    """Refuse a subset file that does not fit the fold, naming the wrong entry (a case that is not one of the
    fold's training cases, a slice index outside its case) and the fix."""
    key = "labelled_cases" if unit == "cases" else "labelled_slices"
    if sorted(content.get("training_cases") or []) != training_cases:
        raise ConfigurationError(f"{path} was drawn from other training cases than this fold's (splits_final.json "
                                 f"changed?); delete it to draw the labelled subset again")
    chosen = content.get(key)
    if unit == "cases":
        if not isinstance(chosen, list) or not chosen:
            raise ConfigurationError(f"{path}: {key!r} must be a list of one or more of the fold's training cases "
                                     f"({_listed(training_cases)}), got {chosen!r}; {EDIT_OR_DELETE}")
        for case in chosen:
            if case not in training_cases:
                raise ConfigurationError(_wrong_case(path, key, case, training_cases, fold, validation_cases))
        return
    if content.get("slices_per_case") != slices_per_case:
        raise ConfigurationError(f"{path} was drawn for other slice counts than the preprocessed data has now "
                                 f"(preprocessed again?); delete it to draw the labelled subset again")
    if not isinstance(chosen, dict) or not any(chosen.values()):
        raise ConfigurationError(f"{path}: {key!r} must map training cases to lists of slice indices, at least one "
                                 f"slice in all, got {chosen!r}; {EDIT_OR_DELETE}")
    for case, slices in chosen.items():
        if case not in slices_per_case:
            raise ConfigurationError(_wrong_case(path, key, case, training_cases, fold, validation_cases))
        bad = [z for z in (slices if isinstance(slices, list) else [slices])
               if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z < slices_per_case[case]]
        if bad or not isinstance(slices, list):
            raise ConfigurationError(f"{path}: {key} of {case!r} holds {bad[0] if bad else slices!r}, but {case} has "
                                     f"slices 0 to {slices_per_case[case] - 1} (a list of whole numbers); "
                                     f"{EDIT_OR_DELETE}")


def labelled_training_dataset(dataset: Any, *, dataset_class: type, preprocessed_folder: str,
                              folder_with_segs_from_previous_stage: str | None, splits_folder: str | os.PathLike,
                              data_identifier: str, fold: int | str, hyperparameters: dict,
                              validation_cases: Sequence[str] = ()) -> Any:
    """The training ``dataset`` (nnU-Net's, of the fold's training cases) restricted to the labelled subset the
    hyper-parameters ask for, drawn now and written to :func:`subset_file` in ``splits_folder`` or read from
    there; ``dataset`` itself when ``labelled_fraction`` is absent or 1. ``hyperparameters`` are the trainer's,
    already checked by :func:`check_labelled_options` in ``set_hyperparameters``. Raises ConfigurationError
    for a subset file that does not fit the fold (naming the wrong entry; ``validation_cases``, the fold's,
    let the message say when an entry is one of them)."""
    fraction = hyperparameters.get("labelled_fraction")
    if fraction is None or fraction >= 1:
        return dataset
    unit = hyperparameters.get("labelled_unit", DEFAULT_UNIT)
    seed = hyperparameters.get("labelled_seed", DEFAULT_SEED)
    training_cases = sorted(dataset.identifiers)
    path = subset_file(splits_folder, fold=fold, unit=unit, fraction=fraction, seed=seed,
                       data_identifier=data_identifier)
    slices_per_case = _slices_per_case(dataset) if unit == "slices" else None
    if path.is_file():
        content = _read_subset(path)
        _check_subset(content, path, training_cases, unit, slices_per_case, fold=fold,
                      validation_cases=validation_cases)
        logger.info("labelled subset read from %s", path)
    else:
        content = {"format": FORMAT, "fold": fold, "unit": unit, "fraction": fraction, "seed": seed,
                   "rounding": "max(1, floor(fraction * N))", "training_cases": training_cases}
        if unit == "cases":
            content["labelled_cases"] = draw_cases(training_cases, fraction, seed)
        else:
            content.update(data_identifier=data_identifier, slices_per_case=slices_per_case,
                           labelled_slices=draw_slices(slices_per_case, fraction, seed))
        write_json_atomically(path, content)
        logger.info("labelled subset drawn and written to %s", path)
    if unit == "cases":
        return dataset_class(preprocessed_folder, content["labelled_cases"],
                             folder_with_segs_from_previous_stage=folder_with_segs_from_previous_stage)
    return LabelledSlicesDataset(dataset, content["labelled_slices"])


def describe_subset(dataset: Any, total_cases: int) -> str:
    """One line for the training log: how much of the fold's training data is labelled."""
    if isinstance(dataset, LabelledSlicesDataset):
        slices = sum(len(v) for v in dataset.labelled.values())
        return f"labelled subset: {slices} slice(s) in {len(dataset.identifiers)} of {total_cases} training case(s)"
    return f"labelled subset: {len(dataset.identifiers)} of {total_cases} training case(s)"
