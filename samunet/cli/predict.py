"""``samunet_predict -i IN -o OUT -d ID -c 2d -tr NAME -f 0 1 2 3 4``: ensemble folds on new images.

nnunetv2's ``nnUNetv2_predict`` (and, with ``-m MODEL_FOLDER``, ``nnUNetv2_predict_from_modelfolder``)
for samunet models, with nnU-Net's options and spellings. The network is rebuilt from the trained
model's plans by the trainer class (samunet registry), each fold's checkpoint is loaded with
``weights_only=True`` and checked against it, and nnunetv2's predictor (the trainer's
``predictor_class()``) does preprocessing, sliding-window inference (Gaussian weighting, mirroring
unless ``--disable_tta``), fold averaging and export in each input's original geometry.

Each case is written as soon as it is done, atomically (see :mod:`samunet.inference.predict_cases`),
so an interrupted run leaves only complete outputs and ``--continue_prediction`` picks up where it
stopped; ``-num_parts N -part_id I`` predict every N-th case (nnU-Net's split) so that several
processes or machines share one input folder; ``-npp`` / ``-nps`` set the preprocessing and export
worker processes (0: in this process).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from samunet.cli.common import (SMALL_MACHINE_CORES, NnunetStyleParser, add_common_arguments, parse_fold,
                                 prepare_environment, refuse_option, run_cli, select_device, setup_logging,
                                 worker_count)
from samunet.cli.train import PRECISION_CHOICES
from samunet.errors import ConfigurationError, DatasetError

logger = logging.getLogger(__name__)


def model_folder(dataset_name: str, trainer_name: str, plans_identifier: str, configuration: str) -> Path:
    from nnunetv2.paths import nnUNet_results
    return Path(nnUNet_results) / dataset_name / f"{trainer_name}__{plans_identifier}__{configuration}"


def load_fold_checkpoints(folder: Path, folds: Sequence[int | str], checkpoint_name: str,
                          trainer_name: str) -> list[dict]:
    import torch
    checkpoints = []
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint_name
        if not path.is_file():
            raise DatasetError(f"{path} does not exist; train fold {fold} first "
                               f"(samunet_train ... {fold} -tr {trainer_name}) or choose other folds with -f")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("trainer_name") != trainer_name:
            raise DatasetError(f"{path} was trained with {checkpoint.get('trainer_name')}, not {trainer_name}")
        checkpoints.append({"path": path, **checkpoint})
    return checkpoints


def build_predictor(dataset_name: str, configuration: str, trainer_name: str, folds: Sequence[int | str], *,
                    plans_identifier: str = "samunetPlans", checkpoint_name: str = "checkpoint_final.pth",
                    device: str | None = None, use_mirroring: bool = True, tile_step_size: float = 0.5,
                    folder: Path | None = None, progress: bool = False, verbose: bool = False,
                    on_device: bool = True, precision: str | None = None):
    """An initialised predictor (the trainer's ``predictor_class()``) holding the folds' weights.

    ``folder``: the model folder (default ``$nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION``);
    ``progress``: nnunetv2's progress bar over each case's sliding-window steps; ``on_device``:
    keep the sliding window's result arrays on the GPU (nnU-Net's ``perform_everything_on_device``);
    ``precision``: the network's precision (None: nnU-Net's, float16 autocast on CUDA and float32 elsewhere;
    :class:`samunet.inference.batched_predictor.BatchedPredictor`). Raises ConfigurationError for a precision the
    device cannot run.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samunet.preprocessing.dataset_checks import check_dataset_json_fields
    from samunet.registry import TRAINERS
    from samunet.trainers.base import check_network_fits
    from samunet.trainers.run_identity import check_checkpoint_identity

    trainer_class = TRAINERS.get(trainer_name)
    folder = Path(folder) if folder is not None else model_folder(dataset_name, trainer_name, plans_identifier,
                                                                  configuration)
    from samunet.inference.model_folder import check_model_folder
    check_model_folder(folder, folds, checkpoint_name)
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    check_dataset_json_fields(dataset_json, folder / "dataset.json", training=False)
    plans_manager = PlansManager(plans)
    configuration_manager = trainer_class.inference_configuration(plans_manager.get_configuration(configuration))
    num_input_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_outputs, enable_deep_supervision=False)
    checkpoints = load_fold_checkpoints(folder, folds, checkpoint_name, trainer_name)
    for checkpoint in checkpoints:
        check_network_fits(checkpoint.get("samunet", {}), network, str(checkpoint["path"]))
        check_checkpoint_identity(checkpoint, dataset_name=plans_manager.dataset_name,
                                  plans_identifier=plans_manager.plans_name, plans=plans,
                                  source=str(checkpoint["path"]))
    device = select_device(device)
    predictor = trainer_class.predictor_class()(
        tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
        perform_everything_on_device=device.type == "cuda" and on_device, device=device, verbose=verbose,
        verbose_preprocessing=verbose, allow_tqdm=progress, precision=precision)
    mirroring = checkpoints[0].get("inference_allowed_mirroring_axes")
    predictor.manual_initialization(network.to(device), plans_manager, configuration_manager,
                                    [c["network_weights"] for c in checkpoints], dataset_json, trainer_name,
                                    tuple(mirroring) if mirroring is not None else None)
    return predictor


def default_worker_count(variable: str) -> int:
    """nnU-Net's default for -npp / -nps: ``$nnUNet_npp`` / ``$nnUNet_nps``, else 3; on small machines
    (<= 4 cores) 0, i.e. in this process, because a spawned worker costs seconds and ~0.5 GB there."""
    value = os.environ.get(variable)
    if value:
        try:
            return max(0, int(value))
        except ValueError:
            raise ConfigurationError(f"{variable}={value!r} must be a whole number of processes") from None
    return 3 if (os.cpu_count() or 1) > SMALL_MACHINE_CORES else 0


def predict_folder(predictor, input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                   save_probabilities: bool = False, *, continue_prediction: bool = False, num_parts: int = 1,
                   part_id: int = 0, num_processes_preprocessing: int = 0, num_processes_export: int = 0,
                   progress: bool = True) -> list[Path]:
    """Predict the cases of ``input_folder`` into ``output_folder``; returns the label maps written.

    Every input file is checked first (:func:`samunet.input_checks.prediction_cases`: names, channels,
    contents, spacing against the model's, see :func:`model_grid`), and an output folder holding another
    model's predictions is refused (:func:`samunet.inference.predict_cases.check_output_folder_model`),
    so bad input is refused before anything is written.

    Each case is written as soon as it is done, atomically. With ``save_probabilities`` each case's
    softmax probabilities (``CASE.npz``) and geometry (``CASE.pkl``) are written too (input of
    ``samunet_ensemble``). The model's ``dataset.json`` and ``plans.json`` are always written next to
    the predictions, as nnunetv2 does (``samunet_apply_postprocessing`` and ensembling read them).
    ``continue_prediction`` skips cases whose outputs exist and are complete (cut-off ones are redone);
    ``num_parts`` / ``part_id`` predict ``cases[part_id::num_parts]``.
    """
    from samunet.inference.predict_cases import (check_output_folder_model, predict_cases, select_cases,
                                                 write_model_files)
    from samunet.input_checks import prediction_cases
    input_folder, output_folder = Path(input_folder), Path(output_folder)
    cases = prediction_cases(input_folder, predictor.dataset_json,
                             reader_class=predictor.plans_manager.image_reader_writer_class,
                             num_processes=num_processes_preprocessing, model_grid=model_grid(predictor))
    check_output_folder_model(predictor, output_folder)
    write_model_files(predictor, output_folder)
    files, outputs = select_cases(predictor, cases, output_folder, continue_prediction=continue_prediction,
                                  num_parts=num_parts, part_id=part_id, save_probabilities=save_probabilities)
    return predict_cases(predictor, files, outputs, save_probabilities=save_probabilities,
                         num_processes_preprocessing=num_processes_preprocessing,
                         num_processes_export=num_processes_export, progress=progress)


def model_grid(predictor):
    """The grid ``predictor`` resamples its inputs to (:class:`samunet.input_checks.ModelGrid`): its
    configuration's spacing, median image size and patch size, the plans' axis order, its step size."""
    from samunet.input_checks import ModelGrid
    configuration = predictor.configuration_manager
    return ModelGrid(spacing=tuple(configuration.spacing),
                     transpose_forward=tuple(predictor.plans_manager.transpose_forward),
                     median_size=tuple(configuration.median_image_size_in_voxels),
                     patch_size=tuple(configuration.patch_size), tile_step_size=predictor.tile_step_size)


def build_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(prog="samunet_predict", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", required=True, help="folder with images named CASE_XXXX.nii.gz")
    parser.add_argument("-o", "--output", required=True, help="folder for the label maps")
    parser.add_argument("-d", "--dataset", default=None, help="dataset ID or name the model was trained on")
    parser.add_argument("-m", "--model-folder", dest="model_folder", default=None,
                        help="the trained model folder TRAINER__PLANS__CONFIGURATION itself, instead of -d/-tr/-p/-c "
                             "(nnUNetv2_predict_from_modelfolder)")
    parser.add_argument("-c", "--configuration", default=None, help="configuration (default 2d)")
    parser.add_argument("-tr", "--trainer", default=None, help="trainer (default SAMedTrainer)")
    parser.add_argument("-p", "--plans", default=None, help="plans identifier (default samunetPlans)")
    parser.add_argument("-f", "--folds", nargs="+", type=parse_fold, default=[0, 1, 2, 3, 4])
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("-step_size", "--step-size", dest="step_size", type=float, default=0.5,
                        help="sliding-window step as a fraction of the patch (default 0.5, at most 1)")
    parser.add_argument("--disable_tta", "--disable-tta", dest="disable_tta", action="store_true",
                        help="no mirroring test-time augmentation")
    parser.add_argument("--save_probabilities", "--save-probabilities", dest="save_probabilities",
                        action="store_true",
                        help="also write CASE.npz/.pkl softmax probabilities (input for samunet_ensemble)")
    parser.add_argument("--continue_prediction", "--continue-prediction", "--c", dest="continue_prediction",
                        action="store_true", help="skip cases whose outputs already exist (resume a stopped run)")
    parser.add_argument("-npp", type=worker_count, default=None,
                        help="preprocessing worker processes (default $nnUNet_npp, else 3; 0 on machines with "
                             "<= 4 cores: in this process)")
    parser.add_argument("-nps", type=worker_count, default=None,
                        help="export worker processes (default $nnUNet_nps, else 3; 0 on machines with "
                             "<= 4 cores: in this process)")
    parser.add_argument("-num_parts", "--num-parts", dest="num_parts", type=int, default=1,
                        help="number of processes sharing this input folder (default 1)")
    parser.add_argument("-part_id", "--part-id", dest="part_id", type=int, default=0,
                        help="which of -num_parts this is (0..num_parts-1): predicts cases[part_id::num_parts]")
    parser.add_argument("--disable_progress_bar", "--disable-progress-bar", dest="disable_progress_bar",
                        action="store_true", help="no progress bars (over cases and inside each case)")
    parser.add_argument("--not_on_device", "--not-on-device", dest="not_on_device", action="store_true",
                        help="keep the sliding window's result arrays in CPU memory (large cases on a small GPU)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                        help="the network's precision: default nnU-Net's (fp16 autocast on CUDA, fp32 elsewhere); "
                             "bf16 = autocast bfloat16 (CUDA; a CPU with native bfloat16, e.g. AVX512-BF16 or AMX, "
                             "where it is several times faster than fp32; slower on other CPUs); fp32 = no autocast")
    refuse_option(parser, "-prev_stage_predictions",
                  reason="samunet plans one 2d configuration and no cascade, so there is no previous stage")
    parser.add_argument("--classes", help="comma-separated class names or label values to predict "
                                          "(class-prompted trainers such as AutoMedSAMTrainer); default: all")
    parser.add_argument("--overlays", action="store_true",
                        help="also draw each prediction on its image into OUTPUT/overlays/CASE.png (the slices with "
                             "the most foreground; samunet_overlays draws existing folders; docs/overlays.md)")
    add_common_arguments(parser)
    return parser


def resolve_model(args: argparse.Namespace) -> tuple[str, str, str, str, Path | None]:
    """(dataset name, trainer, plans, configuration, model folder or None) from -d/-tr/-p/-c or -m."""
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    if args.model_folder is None:
        if args.dataset is None:
            raise ConfigurationError("give the model with -d DATASET (and -tr/-p/-c) or with -m MODEL_FOLDER")
        return (resolve_dataset_name(args.dataset), args.trainer or "SAMedTrainer", args.plans or "samunetPlans",
                args.configuration or "2d", None)
    given = [flag for flag, value in (("-d", args.dataset), ("-tr", args.trainer), ("-p", args.plans),
                                      ("-c", args.configuration)) if value is not None]
    if given:
        raise ConfigurationError(f"-m names the model folder itself; drop {' '.join(given)}")
    folder = Path(args.model_folder)
    parts = folder.resolve().name.split("__")
    if len(parts) != 3 or not (folder / "plans.json").is_file():
        raise DatasetError(f"-m {folder} is not a trained model folder TRAINER__PLANS__CONFIGURATION with plans.json")
    trainer, plans, configuration = parts
    return folder.resolve().parent.name, trainer, plans, configuration, folder


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    prepare_environment()
    if not 0 < args.step_size <= 1:
        raise ConfigurationError(f"-step_size must be in (0, 1], got {args.step_size}")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise ConfigurationError(f"-part_id must be in 0..{args.num_parts - 1} for -num_parts {args.num_parts}, "
                                 f"got {args.part_id}")
    dataset_name, trainer, plans, configuration, folder = resolve_model(args)
    predictor = build_predictor(dataset_name, configuration, trainer, args.folds,
                                plans_identifier=plans, checkpoint_name=args.checkpoint, device=args.device,
                                use_mirroring=not args.disable_tta, tile_step_size=args.step_size,
                                folder=folder, progress=not args.disable_progress_bar, verbose=args.verbose,
                                on_device=not args.not_on_device, precision=args.precision)
    if args.classes:
        if not hasattr(predictor.network, "set_predict_classes"):
            raise ConfigurationError(f"{trainer} predicts all classes at once; --classes needs a "
                                     f"class-prompted trainer such as AutoMedSAMTrainer")
        from samunet.networks.automedsam import parse_class_selection
        predictor.network.set_predict_classes(parse_class_selection(args.classes, predictor.dataset_json["labels"]))
    npp = default_worker_count("nnUNet_npp") if args.npp is None else args.npp
    nps = default_worker_count("nnUNet_nps") if args.nps is None else args.nps
    written = predict_folder(predictor, args.input, args.output, save_probabilities=args.save_probabilities,
                             continue_prediction=args.continue_prediction, num_parts=args.num_parts,
                             part_id=args.part_id, num_processes_preprocessing=npp, num_processes_export=nps,
                             progress=not args.disable_progress_bar)
    logger.info("wrote %d label maps to %s", len(written), args.output)
    if args.overlays:
        from samunet.reporting.overlays import write_prediction_overlays
        write_prediction_overlays(args.input, args.output, predictor.dataset_json, num_parts=args.num_parts,
                                  part_id=args.part_id)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
