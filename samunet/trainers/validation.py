"""The final validation of a samunet trainer, on nnunetv2's public entry points.

nnunetv2's ``nnUNetTrainer.perform_actual_validation`` builds its ``nnUNetPredictor`` inline, so a
trainer whose network needs another predictor (the slice-stack predictor of Self-Prompt-SAM) could
only get it there by patching nnunetv2's module globals. samunet instead runs the same steps
itself, with the predictor class the trainer names (``SAMTrainerBase.predictor_class``):
nnunetv2's predictor (``manual_initialization``, ``predict_sliding_window_return_logits``: Gaussian
sliding window, mirroring), its export (``export_prediction_from_logits``: original geometry) and
its evaluation (``compute_metrics_on_folder`` into ``validation/summary.json``), with the
validation cases of the fold split over the ranks of a distributed run as nnunetv2 does.
Every case is exported as ``samunet_predict`` exports it (:func:`samunet.inference.predict_cases.
export_case_atomically`: staged, checked, then moved into place) and the summary is written atomically,
so a full disk ends the validation with an ``OSError`` naming the file and leaves no cut-off output.
Cascades (``next_stage_names``) are not supported: samunet plans a single ``2d`` configuration.

The predictor runs several tiles per network call
(:class:`~samunet.inference.batched_predictor.BatchedPredictor`), with nnU-Net's mirroring. The user can
skip the final validation (``--disable_validation_inference``, nnU-Net v1's spelling:
:func:`note_skipped_validation`) or thin it to ``num_cases`` of the fold's validation cases (``--val_cases``:
:func:`thinned_cases`, spread evenly over the sorted case names). A thinned validation says so in the log and
in ``validation/summary.json`` (key :data:`SUBSET_KEY`), and ``validation/`` then holds only the cases it
evaluated: predictions left there by an earlier validation of other cases are removed, because nnunetv2
evaluates every prediction in the folder.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING

import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, save_summary_json
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch import distributed as dist

from samunet.atomic_files import write_atomically_by_name
from samunet.errors import ConfigurationError
from samunet.inference.predict_cases import export_case_atomically
from samunet.staged_writes import remove_stale_scratch, scratch_prefix

if TYPE_CHECKING:
    from samunet.trainers.base import SAMTrainerBase

MAX_EXPORTS_IN_FLIGHT = 2  # predictions waiting for export at once (as nnunetv2): bounds the memory held
SUBSET_KEY = "samunet_validation_subset"  # in summary.json of a thinned validation: which cases it covers


def thinned_cases(keys: list[str], num_cases: int | None) -> list[str]:
    """``num_cases`` of the validation cases ``keys`` (all for None or at least as many as there are), spread
    evenly over their sorted names, so the same cases are chosen every time; ``num_cases`` < 1 raises
    ConfigurationError."""
    if num_cases is None:
        return list(keys)
    check_val_cases(num_cases)
    ordered = sorted(keys)
    if num_cases >= len(ordered):
        return ordered
    return [ordered[(i * len(ordered)) // num_cases] for i in range(num_cases)]


def check_val_cases(num_cases: int | None) -> None:
    """Refuse a ``--val_cases`` below 1 (ConfigurationError)."""
    if num_cases is not None and num_cases < 1:
        raise ConfigurationError(f"--val_cases must be at least 1, got {num_cases}; to skip the final validation "
                                 f"use --disable_validation_inference")


def note_skipped_validation(trainer: SAMTrainerBase) -> None:
    """Say in the log (and on the console) that the final validation was skipped, and that a
    ``validation/summary.json`` or overlay PNGs still in the fold folder come from an earlier run."""
    trainer.print_to_log_file("Final validation skipped (--disable_validation_inference): no validation/summary.json "
                              "is written for these weights", also_print_to_console=True)
    summary = os.path.join(trainer.output_folder, "validation", "summary.json")
    if os.path.isfile(summary):
        trainer.print_to_log_file(f"WARNING: {summary} is from an earlier validation, not of these weights",
                                  also_print_to_console=True)
    overlays = os.path.join(trainer.output_folder, "validation", "overlays")
    if os.path.isdir(overlays) and any(name.endswith(".png") for name in os.listdir(overlays)):
        trainer.print_to_log_file(f"WARNING: the PNGs in {overlays} are from an earlier validation, not of these "
                                  f"weights", also_print_to_console=True)


def run_final_validation(trainer: SAMTrainerBase, save_probabilities: bool = False,
                         num_cases: int | None = None) -> dict | None:
    """Predict the fold's validation cases (``num_cases`` of them, :func:`thinned_cases`; None: all) with
    ``trainer.predictor_class()``, export them to ``<fold>/validation`` and evaluate them there; returns
    nnunetv2's metrics (rank 0) or None."""
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = trainer.predictor_class()(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                          perform_everything_on_device=True, device=trainer.device, verbose=False,
                                          verbose_preprocessing=False, allow_tqdm=False,
                                          precision=trainer.precision.name)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    output_folder = os.path.join(trainer.output_folder, "validation")
    os.makedirs(output_folder, exist_ok=True)
    _, all_keys = trainer.do_split()
    keys = thinned_cases(all_keys, num_cases)
    thinned = len(keys) < len(all_keys)
    if thinned:
        trainer.print_to_log_file(f"THINNED final validation (--val_cases {num_cases}): {len(keys)} of the fold's "
                                  f"{len(all_keys)} validation cases; not a full validation",
                                  also_print_to_console=True)
    if trainer.local_rank == 0:
        remove_other_cases(output_folder, set(all_keys) - set(keys), trainer.dataset_json["file_ending"])
    rank_keys = keys[trainer.local_rank::dist.get_world_size()] if trainer.is_ddp else keys
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, rank_keys)
    remove_stale_scratch(output_folder)
    scratch = tempfile.mkdtemp(prefix=scratch_prefix(), dir=output_folder)
    try:
        with multiprocessing.get_context("spawn").Pool(default_num_processes) as export_pool:
            pending = []
            for key in dataset.identifiers:
                trainer.print_to_log_file(f"predicting {key}")
                data, _, _, properties = dataset.load_case(key)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # 'The given NumPy array is not writable'
                    data = torch.from_numpy(data[:])
                # a NumPy array travels to the worker inside the pickle, as samunet_predict's do; a tensor would be
                # handed over by file descriptor through multiprocessing's resource_sharer thread, which prints a
                # traceback into the command's error output when a failed export terminates the pool mid-handover
                logits = predictor.predict_sliding_window_return_logits(data).cpu().numpy()
                while sum(not result.ready() for result in pending) >= MAX_EXPORTS_IN_FLIGHT:
                    next(result for result in pending if not result.ready()).wait(0.1)
                pending.append(export_pool.starmap_async(export_case_atomically, (
                    (logits, properties, trainer.configuration_manager, trainer.plans_manager, trainer.dataset_json,
                     os.path.join(output_folder, key), save_probabilities, scratch),)))
            for result in pending:
                result.get()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if trainer.is_ddp:
        dist.barrier()
    metrics = None
    if trainer.local_rank == 0:
        labels = trainer.label_manager
        metrics = compute_metrics_on_folder(
            os.path.join(trainer.preprocessed_dataset_folder_base, "gt_segmentations"), output_folder,
            None, trainer.plans_manager.image_reader_writer_class(),
            trainer.dataset_json["file_ending"],
            labels.foreground_regions if labels.has_regions else labels.foreground_labels, labels.ignore_label,
            chill=True,
            num_processes=default_num_processes * (dist.get_world_size() if trainer.is_ddp else 1))
        if thinned:
            metrics[SUBSET_KEY] = {"validated_cases": len(keys), "fold_validation_cases": len(all_keys),
                                   "cases": keys, "note": f"thinned with --val_cases {num_cases}; not a full "
                                                          f"validation of the fold"}
        save_summary_atomically(metrics, os.path.join(output_folder, "summary.json"))
        for label in metrics["mean"]:
            trainer.logger.log_summary(f"final_val/class_{label}_dice", metrics["mean"][label]["Dice"])
        trainer.logger.log_summary("final_val/foreground_dice", metrics["foreground_mean"]["Dice"])
        trainer.print_to_log_file("Validation complete", also_print_to_console=True)
        trainer.print_to_log_file("Mean Validation Dice: ", metrics["foreground_mean"]["Dice"],
                                  f"({len(keys)} of {len(all_keys)} cases: THINNED)" if thinned else "",
                                  also_print_to_console=True)
    trainer.set_deep_supervision_enabled(True)
    compute_gaussian.cache_clear()
    return metrics


def remove_other_cases(output_folder: str, cases: set[str], file_ending: str) -> None:
    """Remove the outputs (label map, ``.npz``, ``.pkl``) of ``cases`` that an earlier validation left in
    ``output_folder``: nnunetv2 evaluates every prediction there, and this validation does not cover them."""
    for case in sorted(cases):
        for suffix in (file_ending, ".npz", ".pkl"):
            path = os.path.join(output_folder, case + suffix)
            if os.path.isfile(path):
                os.remove(path)


def save_summary_atomically(metrics: dict, path: str) -> None:
    """nnunetv2's ``save_summary_json`` (its key conversion and layout) written atomically
    (:func:`samunet.atomic_files.write_atomically_by_name`): a full disk names ``path`` and leaves the
    previous file."""
    write_atomically_by_name(path, lambda name: save_summary_json(metrics, name), suffix=".json")
