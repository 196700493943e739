"""``samunet_train DATASET CONFIG FOLD -tr NAME``: train a samunet trainer the nnU-Net way.

Mirrors nnunetv2's ``nnUNetv2_train`` (output layout, checkpoints, progress.png,
validation/summary.json) with its options and spellings (``--c``, ``--val``, ``--val_best``,
``--npz``, ``--disable_checkpointing``, ``-pretrained_weights`` to fine-tune from a trained samunet
model), but resolves trainers through samunet's registry, because nnunetv2's ``-tr`` lookup only
searches inside nnunetv2.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from samunet.cli.common import (NnunetStyleParser, add_common_arguments, parse_fold, prepare_environment,
                                 run_cli, select_device, setup_logging)
from samunet.errors import ConfigurationError, DatasetError

logger = logging.getLogger(__name__)


def load_plans(dataset_name: str, plans_identifier: str) -> tuple[dict, dict]:
    """(plans, dataset.json) of the preprocessed data set; a missing or unreadable file (cut off by a killed
    planning run) is a DatasetError naming it."""
    from nnunetv2.paths import nnUNet_preprocessed
    folder = Path(nnUNet_preprocessed) / dataset_name
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise DatasetError(f"{plans_file} does not exist; run `samunet_plan_and_preprocess -d {dataset_name}` first")
    contents = []
    for path in (plans_file, folder / "dataset.json"):
        try:
            contents.append(json.loads(path.read_text(encoding="utf-8")))
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DatasetError(f"{path} cannot be read ({error}); run `samunet_plan_and_preprocess -d "
                               f"{dataset_name}` again to repair it") from error
    return contents[0], contents[1]


def apply_backbone_override(plans: dict, configuration: str, backbone: str | None, weights: str | None) -> None:
    """Point the plans' architecture at another backbone and/or weights' pixel convention."""
    from samunet.backbones.catalog import check_img_size, get_backbone_spec
    from samunet.trainers.base import known_pixel_normalization
    if configuration not in plans["configurations"]:
        raise ConfigurationError(f"configuration {configuration!r} is not in the plans "
                                 f"(have {sorted(plans['configurations'])})")
    arch_kwargs = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    if backbone is not None:
        spec = get_backbone_spec(backbone)
        check_img_size(spec, arch_kwargs["img_size"])
        arch_kwargs["backbone"] = backbone
        arch_kwargs["pixel_normalization"] = spec.pixel_normalization
    normalization = known_pixel_normalization(weights)
    if normalization is not None:
        arch_kwargs["pixel_normalization"] = normalization


def apply_depth_override(plans: dict, configuration: str, depth: int | None, trainer_class: type) -> None:
    """Set the slices per stack (``arch_kwargs.depth``) of a slice-stack trainer; the model folder's
    plans.json then records the depth the model was trained with, which prediction rebuilds."""
    if depth is None:
        return
    if not getattr(trainer_class, "uses_slice_stacks", False):
        raise ConfigurationError(f"--depth applies to slice-stack trainers (e.g. SelfPromptSAMTrainer); "
                                 f"{trainer_class.__name__} sees single slices")
    if depth < 1:
        raise ConfigurationError(f"--depth must be >= 1, got {depth}")
    plans["configurations"][configuration]["architecture"]["arch_kwargs"]["depth"] = int(depth)


def check_sam_options(trainer_class: type, *, backbone: str | None, weights: str | None) -> None:
    """Refuse the options that choose a SAM encoder (``--backbone``, ``--weights`` other than none) for a
    trainer without one (``uses_sam_backbone = False``: nnUNetTrainerSamunetPlans), as ``--depth`` is refused
    for trainers without slice stacks (:func:`apply_depth_override`)."""
    if getattr(trainer_class, "uses_sam_backbone", True):
        return
    given = ([f"--backbone {backbone}"] if backbone is not None else []) + \
        ([f"--weights {weights}"] if weights not in (None, "none", "random") else [])
    if given:
        raise ConfigurationError(f"{' and '.join(given)} select(s) a SAM encoder; {trainer_class.__name__} trains "
                                 f"nnU-Net's 2d U-Net from scratch: leave {' and '.join(g.split()[0] for g in given)} "
                                 f"out")


def check_fold_possible(dataset_name: str, dataset_json: dict, fold: int | str) -> None:
    """nnU-Net's automatic 5-fold split needs at least 5 training cases."""
    from nnunetv2.paths import nnUNet_preprocessed
    if fold == "all" or (Path(nnUNet_preprocessed) / dataset_name / "splits_final.json").is_file():
        return
    if dataset_json["numTraining"] < 5:
        raise ConfigurationError(f"{dataset_name} has {dataset_json['numTraining']} training cases; the automatic "
                                 f"5-fold split needs at least 5. Train with fold 'all' or provide splits_final.json")


def train(dataset: str | int, configuration: str, fold: int | str, trainer_name: str, *,
          plans_identifier: str = "samunetPlans", continue_training: bool = False, only_validate: bool = False,
          device: str | None = None, hyperparameters: dict | None = None, backbone: str | None = None,
          save_probabilities: bool = False, depth: int | None = None, pretrained_weights: str | None = None,
          val_best: bool = False, disable_checkpointing: bool = False, overlays: bool = False,
          skip_final_validation: bool = False, val_cases: int | None = None):
    """Train (and validate) one fold; returns the trainer.

    ``skip_final_validation`` (``--disable_validation_inference``): no final validation, said in the log;
    ``val_cases`` (``--val_cases N``): validate only N of the fold's validation cases, marked as thinned in the
    log and in validation/summary.json (:mod:`samunet.trainers.validation`). ``--npz`` and ``--val`` keep
    nnU-Net's meaning (``--val`` validates every case unless ``val_cases`` thins it).

    ``overlays``: after the final validation, draw each validation case (raw image, reference from
    ``gt_segmentations``, prediction) into ``<fold>/validation/overlays/CASE.png``
    (:func:`samunet.reporting.overlays.write_validation_overlays`); the raw images must be in $nnUNet_raw.

    nnU-Net's options: ``pretrained_weights`` (a samunet checkpoint whose network weights the new
    network starts from, :mod:`samunet.trainers.finetune`), ``val_best`` (validate with
    checkpoint_best.pth), ``disable_checkpointing`` (write no checkpoints).

    The fold folder is locked while this runs (:mod:`samunet.trainers.run_lock`: a second training of the
    same fold is refused), what a killed run left half-written there is removed, and the run's settings are
    recorded before the first epoch (:mod:`samunet.trainers.run_settings`). ``--c`` continues from the newest
    checkpoint that can be read (:func:`samunet.trainers.checkpoints.checkpoint_to_continue`) with the settings
    it was started with; options given again win.
    """
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from samunet.preprocessing.completeness import check_preprocessed_dataset
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    from samunet.registry import TRAINERS
    from samunet.trainers.checkpoints import CheckpointUnreadableError, read_checkpoint, remove_stale_partials
    from samunet.trainers.finetune import read_pretrained_weights
    from samunet.trainers.labelled_subset import check_labelled_options
    from samunet.trainers.plans_checks import check_model_folder_plans, check_plans_configuration
    from samunet.precision import choose_precision
    from samunet.trainers.run_lock import hold_fold_folder, takes_the_lock

    if continue_training and only_validate:
        raise ConfigurationError("--c and --val cannot be used together")
    if pretrained_weights is not None and (continue_training or only_validate):
        raise ConfigurationError(f"-pretrained_weights starts a new training; it cannot be combined with "
                                 f"{'--c' if continue_training else '--val'} (as in nnU-Net)")
    if val_best and disable_checkpointing and not only_validate:
        raise ConfigurationError("--val_best validates with checkpoint_best.pth, which --disable_checkpointing "
                                 "never writes; drop one of them")
    check_final_validation_options(skip_final_validation, val_cases, only_validate=only_validate, val_best=val_best,
                                   save_probabilities=save_probabilities, overlays=overlays)
    trainer_class = TRAINERS.get(trainer_name)
    check_sam_options(trainer_class, backbone=backbone, weights=(hyperparameters or {}).get("weights"))
    dataset_name = resolve_dataset_name(dataset)
    plans, dataset_json = load_plans(dataset_name, plans_identifier)
    check_plans_configuration(plans, configuration, trainer_class,
                              source=str(Path(nnUNet_preprocessed) / dataset_name / f"{plans_identifier}.json"))
    check_preprocessed_dataset(dataset_name, plans_identifier, configuration)
    check_fold_possible(dataset_name, dataset_json, fold)
    if overlays:  # the raw images are needed after training: refused now, not after hours
        from samunet.reporting.overlays import training_images
        training_images(dataset_name, dataset_json)
    fold_folder = Path(get_output_folder(dataset_name, trainer_class.__name__, plans["plans_name"], configuration,
                                         fold))
    pretrained = read_pretrained_weights(pretrained_weights) if pretrained_weights is not None else None
    if (hyperparameters or {}).get("precision") is not None:  # refused (fp16 off CUDA) before the fold folder is used
        choose_precision(select_device(device).type, hyperparameters["precision"])
    check_labelled_options(hyperparameters or {}, uses_slice_stacks=getattr(trainer_class, "uses_slice_stacks",
                                                                             False))
    if not (continue_training or only_validate):
        planned = copy.deepcopy(plans)
        apply_backbone_override(planned, configuration, backbone, (hyperparameters or {}).get("weights"))
        apply_depth_override(planned, configuration, depth, trainer_class)
        check_model_folder_plans(fold_folder, planned, configuration, plans_identifier)
    owner = takes_the_lock()
    with hold_fold_folder(fold_folder) if owner else contextlib.nullcontext():
        if owner:
            remove_stale_partials(fold_folder)
        trainer = _set_up_trainer(trainer_class, plans, dataset_json, configuration, fold, fold_folder,
                                  continue_training=continue_training, only_validate=only_validate, device=device,
                                  hyperparameters=dict(hyperparameters or {}), backbone=backbone, depth=depth,
                                  pretrained=pretrained)
        if disable_checkpointing:
            trainer.disable_checkpointing = True
        trainer.final_validation_cases = val_cases
        trainer.skip_final_validation = skip_final_validation  # the --max-minutes estimate then has no validation
        if not only_validate:
            trainer.run_training()
        if val_best:
            best = Path(trainer.output_folder) / "checkpoint_best.pth"
            if not best.is_file():
                raise DatasetError(f"--val_best: {best} does not exist (it is written during training, unless "
                                   f"--disable_checkpointing was set)")
            try:
                checkpoint = read_checkpoint(best, map_location=trainer.device)
            except CheckpointUnreadableError as error:
                raise CheckpointUnreadableError(f"--val_best: {error}; or validate with the final weights: --val "
                                                f"without --val_best") from error
            trainer.load_checkpoint(checkpoint, source=str(best))
        if not skip_final_validation and trainer.local_rank == 0:  # drawn from the predictions this replaces
            from samunet.reporting.overlays import remove_validation_overlays
            stale = remove_validation_overlays(trainer.output_folder)
            if stale:
                trainer.print_to_log_file(f"removed {len(stale)} overlay(s) of the earlier validation from "
                                          f"{stale[0].parent}" + ("" if overlays else " (--overlays draws new ones)"))
        trainer.perform_actual_validation(save_probabilities)
        if overlays and trainer.local_rank == 0:
            from samunet.reporting.overlays import write_validation_overlays
            write_validation_overlays(trainer.output_folder, dataset_name, trainer.dataset_json,
                                      Path(trainer.preprocessed_dataset_folder_base) / "gt_segmentations")
    return trainer


def check_final_validation_options(skip_final_validation: bool, val_cases: int | None, *, only_validate: bool,
                                   val_best: bool, save_probabilities: bool, overlays: bool) -> None:
    """Refuse ``--val_cases`` below 1, a bad ``$SAMUNET_TILES_PER_BATCH`` (before training, not after it), and
    ``--disable_validation_inference`` with an option that asks for the final validation or its outputs
    (``--val``, ``--val_best``, ``--npz``, ``--val_cases``, ``--overlays``)."""
    from samunet.inference.batched_predictor import requested_tiles_per_batch
    from samunet.trainers.validation import check_val_cases
    check_val_cases(val_cases)
    requested_tiles_per_batch(None)
    if not skip_final_validation:
        return
    asked = [option for option, given in (("--val", only_validate), ("--val_best", val_best),
                                          ("--npz", save_probabilities), ("--val_cases", val_cases is not None),
                                          ("--overlays", overlays)) if given]
    if asked:
        raise ConfigurationError(f"--disable_validation_inference skips the final validation, which "
                                 f"{' and '.join(asked)} ask(s) for; drop one of them")


def _set_up_trainer(trainer_class: type, plans: dict, dataset_json: dict, configuration: str, fold: int | str,
                    fold_folder: Path, *, continue_training: bool, only_validate: bool, device: str | None,
                    hyperparameters: dict, backbone: str | None, depth: int | None, pretrained=None):
    """The trainer of one fold, with the settings and checkpoint ``--c`` / ``--val`` continue from (the
    recorded settings, then the checkpoint's hyper-parameters, then the options given); for a training, the
    settings are recorded in the fold folder before it starts. ``pretrained``: the ``-pretrained_weights``
    (:class:`samunet.trainers.finetune.PretrainedWeights`) a new training starts from; ``--c`` without a
    checkpoint starts again from those recorded in the settings."""
    from samunet.trainers.base import plain_data
    from samunet.trainers.checkpoints import checkpoint_to_continue, checkpoint_to_validate
    from samunet.trainers.run_identity import check_identity
    from samunet.trainers.run_lock import takes_the_lock
    from samunet.trainers.run_settings import (SETTINGS_FILE, RunSettings, check_continue_options, read_run_settings,
                                               without_training_only, write_run_settings)

    settings, chosen, notes = None, None, []
    if continue_training or only_validate:
        settings = read_run_settings(fold_folder)
        if only_validate:
            chosen = checkpoint_to_validate(fold_folder)
        else:
            chosen, notes = checkpoint_to_continue(fold_folder)
    if only_validate:
        hyperparameters, ignored = without_training_only(hyperparameters)
        notes += [ignored] if ignored else []
    for note in notes:
        logger.warning(note)
    recorded = dict(settings.hyperparameters) if settings else {}
    if chosen is not None:
        recorded.update(chosen.checkpoint.get("samunet", {}).get("hyperparameters", {}))
    overrides = {**recorded, **hyperparameters}
    backbone = backbone if backbone is not None else settings.backbone if settings else None
    depth = depth if depth is not None else settings.depth if settings else None
    apply_backbone_override(plans, configuration, backbone, overrides.get("weights"))
    apply_depth_override(plans, configuration, depth, trainer_class)
    plans["continue_training"] = continue_training
    trainer = trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                            device=select_device(device))
    if continue_training and (settings is not None or chosen is not None):
        check_continue_options(recorded, hyperparameters, source=str(fold_folder), defaults={
            "initial_lr": trainer.initial_lr, "weight_decay": trainer.weight_decay,
            "batch_size": trainer.configuration_manager.batch_size})
    trainer.set_hyperparameters(overrides)
    for note in notes:
        trainer.print_to_log_file(note, also_print_to_console=False)
    if chosen is not None:
        trainer.load_checkpoint(chosen.checkpoint, source=str(chosen.path))
    if settings is not None:
        check_identity(settings.identity, dataset_name=trainer.plans_manager.dataset_name,
                       plans_identifier=trainer.plans_manager.plans_name, plans=trainer.plans_manager.plans,
                       source=str(fold_folder / SETTINGS_FILE))
    if chosen is not None:
        trainer.print_to_log_file(f"loaded {chosen.path}: {trainer.current_epoch} epoch(s) done")
    elif continue_training and settings is not None:
        trainer.print_to_log_file(f"WARNING: no checkpoint in {fold_folder} to continue from; starting at epoch 0 "
                                  f"with the settings recorded in {SETTINGS_FILE}: {settings.describe()}")
        if settings.pretrained_weights:
            from samunet.trainers.finetune import read_pretrained_weights
            pretrained = read_pretrained_weights(settings.pretrained_weights)
    elif continue_training:
        trainer.print_to_log_file(f"WARNING: no checkpoint or recorded settings in {fold_folder} to continue "
                                  f"from; starting a new training with the options given")
    if pretrained is not None and not only_validate:
        from samunet.trainers.finetune import load_pretrained_weights
        trainer.initialize()
        for line in load_pretrained_weights(trainer.network, pretrained).lines():
            trainer.print_to_log_file(line)
    recorded_pretrained = (os.path.abspath(pretrained.path) if pretrained is not None
                           else settings.pretrained_weights if settings is not None else None)
    if not only_validate and takes_the_lock():
        write_run_settings(fold_folder, RunSettings(
            trainer=trainer_class.__name__, hyperparameters=plain_data(trainer.hyperparameters),
            backbone=backbone, depth=depth, identity=trainer.run_identity(), pretrained_weights=recorded_pretrained))
    return trainer


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The options samunet_train and samunet_train_cv share (everything after the positionals).

    Every option of nnunetv2's ``nnUNetv2_train`` has its nnU-Net spelling (``-pretrained_weights``,
    ``--val_best``, ...); samunet's kebab-case names are aliases of the same option.
    """
    parser.add_argument("-tr", "--trainer", default="SAMedTrainer", help="trainer name (samunet registry)")
    parser.add_argument("-p", "--plans", default="samunetPlans", help="plans identifier")
    parser.add_argument("-pretrained_weights", "--pretrained-weights", dest="pretrained_weights", default=None,
                        metavar="CHECKPOINT",
                        help="fine-tune: start from the network weights of this samunet checkpoint (tensors of "
                             "another shape, e.g. class heads, are skipped with a warning); not the SAM backbone "
                             "checkpoint, which is --weights")
    parser.add_argument("-num_gpus", "--num-gpus", dest="num_gpus", type=int, default=None, metavar="N",
                        help="train the fold on N devices with DistributedDataParallel, one process each (NCCL on "
                             "CUDA, gloo with -device cpu); under torchrun the processes come from outside "
                             "(docs/distributed_training.md)")
    parser.add_argument("--c", dest="continue_training", action="store_true", help="continue an interrupted run")
    parser.add_argument("--val", dest="only_validate", action="store_true", help="only run the final validation")
    parser.add_argument("--val_best", "--val-best", dest="val_best", action="store_true",
                        help="run the final validation with checkpoint_best.pth instead of the final weights "
                             "(writes the same validation/ folder)")
    parser.add_argument("--disable_checkpointing", "--disable-checkpointing", dest="disable_checkpointing",
                        action="store_true", help="write no checkpoints (for trying things out)")
    parser.add_argument("--npz", action="store_true", help="also save validation softmax probabilities")
    parser.add_argument("--disable_validation_inference", "--skip-final-validation", dest="skip_final_validation",
                        action="store_true",
                        help="skip the final validation after training (nnU-Net v1's flag): no validation/ "
                             "predictions or summary.json; the log says so")
    parser.add_argument("--val_cases", "--val-cases", dest="val_cases", type=int, default=None, metavar="N",
                        help="thin the final validation (also --val) to N of the fold's validation cases, spread "
                             "evenly over their sorted names; validation/summary.json and the log mark it as "
                             "thinned (default: every case)")
    # each also with underscores, as nnU-Net spells its flags (--val_best, --disable_checkpointing)
    parser.add_argument("--num-epochs", "--num_epochs", dest="num_epochs", type=int,
                        help="override the trainer's epoch count")
    parser.add_argument("--iters-per-epoch", "--iters_per_epoch", dest="iters_per_epoch", type=int,
                        help="override training iterations per epoch")
    parser.add_argument("--val-iters", "--val_iters", dest="val_iters", type=int,
                        help="override validation iterations per epoch")
    parser.add_argument("--lr", type=float, help="override the initial learning rate")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                        help="override the planned batch size")
    parser.add_argument("--backbone", help="train with another backbone than planned")
    parser.add_argument("--weights", help="released SAM backbone checkpoint: known name, path, or 'none' for "
                                          "random init (see -pretrained_weights for a trained samunet model)")
    parser.add_argument("--depth", type=int, help="slices per stack for slice-stack trainers "
                                                  "(SelfPromptSAMTrainer); default: the plans' depth")
    add_precision_option(parser)
    add_max_minutes_option(parser)
    add_labelled_subset_options(parser)
    parser.add_argument("--overlays", action="store_true",
                        help="after the final validation, draw each validation case (image, reference, "
                             "prediction) into <fold>/validation/overlays/CASE.png (docs/overlays.md)")
    add_common_arguments(parser)


# samunet.precision.PRECISIONS, spelled out so that parsing the command line imports no torch
PRECISION_CHOICES = ("fp32", "fp16", "bf16")


def positive_minutes(text: str) -> float:
    """argparse type of ``--max-minutes``: a positive, finite number."""
    try:
        minutes = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if not 0 < minutes < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text}")
    return minutes


def add_max_minutes_option(parser: argparse.ArgumentParser, *, continues: bool = True) -> None:
    """``--max-minutes`` (also ``--max_minutes``, nnU-Net's spelling; samunet_train, samunet_train_cv,
    samunet_demo): the ``max_minutes`` hyper-parameter (:mod:`samunet.trainers.time_budget`, docs/time_budget.md).
    ``continues``: the command has ``--c`` (its help then says how the budget goes on)."""
    parser.add_argument("--max-minutes", "--max_minutes", dest="max_minutes", type=positive_minutes, default=None,
                        metavar="M",
                        help="wall-clock budget of the training of a fold, its final validation included: the "
                             "epochs that fit (at most --num-epochs), with the poly lr stretched over them"
                             + ("; recorded in the checkpoint, --c continues within the remaining minutes"
                                if continues else ""))


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (samunet_train, samunet_train_cv, samunet_demo): the ``precision`` hyper-parameter."""
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                        help="training and validation steps: fp16 = autocast float16 with a GradScaler (CUDA "
                             "only; nnU-Net's default there), bf16 = autocast bfloat16 (CUDA, CPU), fp32 = no "
                             "autocast (nnU-Net's default on CPU and MPS); stored in the checkpoint")


def add_labelled_subset_options(parser: argparse.ArgumentParser) -> None:
    """``--labelled-fraction`` / ``--labelled-unit`` / ``--labelled-seed`` (each also with underscores, nnU-Net's
    spelling; samunet_train, samunet_train_cv, samunet_demo): few labels, :mod:`samunet.trainers.labelled_subset`."""
    parser.add_argument("--labelled-fraction", "--labelled_fraction", dest="labelled_fraction", type=float,
                        default=None, metavar="F",
                        help="train on a seeded fraction 0 < F <= 1 of the fold's training slices (H-SAM's "
                             "few-shot setting: 0.1) or cases (--labelled-unit cases); the draw is written next "
                             "to splits_final.json and reused; validation stays the fold's full set")
    parser.add_argument("--labelled-unit", "--labelled_unit", dest="labelled_unit", choices=("slices", "cases"),
                        default=None,
                        help="what --labelled-fraction draws: 2d slices pooled over the training cases "
                             "(default, H-SAM) or whole cases")
    parser.add_argument("--labelled-seed", "--labelled_seed", dest="labelled_seed", type=int, default=None,
                        metavar="N",
                        help="seed of the --labelled-fraction draw (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(prog="samunet_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset ID (218) or name (Dataset218_AMOS...)")
    parser.add_argument("configuration", help="2d")
    parser.add_argument("fold", type=parse_fold, help="0-4, fold0-fold4 or all")
    add_training_options(parser)
    return parser


HYPERPARAMETER_OPTIONS = {
    "num_epochs": "num_epochs", "iters_per_epoch": "num_iterations_per_epoch",
    "val_iters": "num_val_iterations_per_epoch", "lr": "initial_lr", "batch_size": "batch_size",
    "weights": "weights", "precision": "precision", "labelled_fraction": "labelled_fraction",
    "labelled_unit": "labelled_unit", "labelled_seed": "labelled_seed", "max_minutes": "max_minutes"}
"""Command-line option (argparse dest) -> trainer hyperparameter it overrides."""


def hyperparameters_from_args(args: argparse.Namespace) -> dict:
    """The trainer overrides the command line set, checked: ``{hyperparameter: value}`` for every option of
    :data:`HYPERPARAMETER_OPTIONS` given. A parser without one of them (``samunet_demo`` has no
    ``--val-iters`` or ``--weights``) simply sets none.

    Raises ConfigurationError for labelled-subset options that make no sense (see
    :func:`samunet.trainers.labelled_subset.check_labelled_options`)."""
    pairs = {key: getattr(args, dest, None) for dest, key in HYPERPARAMETER_OPTIONS.items()}
    chosen = {k: v for k, v in pairs.items() if v is not None}
    from samunet.trainers.labelled_subset import check_labelled_options, check_labelled_options_given
    check_labelled_options_given(chosen)  # --labelled-unit / --labelled-seed alone would do nothing
    check_labelled_options(chosen)  # a bad --labelled-fraction stops the command before anything is written
    return chosen


def _main(argv: Sequence[str] | None = None) -> int:
    from samunet.trainers.distributed import launched_by_torchrun
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    prepare_environment()
    run = fold_training(args, args.fold, args.device)
    train_on_processes(run, num_gpus=args.num_gpus, device=args.device, under_torchrun=launched_by_torchrun())
    return 0


def fold_training(args: argparse.Namespace, fold: int | str, device: str | None) -> Callable[[], object]:
    """:func:`train` of ``fold`` on ``device`` with every option of :func:`add_training_options` in ``args``
    (samunet_train, and samunet_train_cv for each of its folds)."""
    return functools.partial(
        train, args.dataset, args.configuration, fold, args.trainer, plans_identifier=args.plans,
        continue_training=args.continue_training, only_validate=args.only_validate, device=device,
        hyperparameters=hyperparameters_from_args(args), backbone=args.backbone, save_probabilities=args.npz,
        depth=args.depth, pretrained_weights=args.pretrained_weights, val_best=args.val_best,
        disable_checkpointing=args.disable_checkpointing, overlays=args.overlays,
        skip_final_validation=args.skip_final_validation, val_cases=args.val_cases)


def training_options_as_arguments(args: argparse.Namespace) -> list[str]:
    """The options of :func:`add_training_options` that ``args`` sets, as samunet_train arguments (each
    option's first spelling), except ``-tr`` and ``-device``: what a worker process is started with. Read
    from the parser itself, so every option samunet_train has is passed on."""
    parser = argparse.ArgumentParser(add_help=False)
    add_training_options(parser)
    arguments = []
    for action in parser._actions:
        if action.dest in ("trainer", "device") or not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if isinstance(action, argparse._StoreTrueAction):
            arguments += [action.option_strings[0]] if value else []
        elif value is not None and value != action.default:
            arguments += [action.option_strings[0], *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return arguments


def train_on_processes(run: Callable[[], object], *, num_gpus: int | None, device: str | None,
                       under_torchrun: bool) -> None:
    """``run()`` in this process, in ``num_gpus`` processes spawned here (DistributedDataParallel), or as
    one process of a group started by torchrun / srun (:mod:`samunet.trainers.distributed`)."""
    from samunet.trainers import distributed
    if num_gpus is not None and num_gpus < 1:
        raise ConfigurationError(f"-num_gpus must be at least 1, got {num_gpus}")
    device_type = select_device(device).type
    if under_torchrun:
        if num_gpus not in (None, 1, int(os.environ["WORLD_SIZE"])):
            raise ConfigurationError(f"-num_gpus {num_gpus} contradicts torchrun's WORLD_SIZE "
                                     f"{os.environ['WORLD_SIZE']}; leave -num_gpus out under torchrun")
        distributed.init_process_group(device_type)
        try:
            run()
        finally:
            distributed.destroy_process_group()
    elif num_gpus is not None and num_gpus > 1:
        distributed.run_distributed(run, (), world_size=num_gpus, device_type=device_type)
    else:
        run()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
