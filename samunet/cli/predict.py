"""``samunet_predict -i IN -o OUT -d ID -c 2d -tr NAME -f 0 1 2 3 4``: ensemble folds on new images.

The network is rebuilt from the trained model's plans by the trainer class (samunet registry),
each fold's checkpoint is loaded with ``weights_only=True`` and checked against it, and
nnunetv2's predictor does preprocessing, sliding-window inference (Gaussian weighting,
mirroring unless ``--disable-tta``), fold averaging and export in each input's original
geometry. Results are written to a temporary folder next to OUT and moved into OUT only when
every case is done, so an interrupted run leaves no half-written outputs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from samunet.cli.common import (add_common_arguments, parse_fold, prepare_environment,
                                 run_cli, select_device, setup_logging)
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
                    device: str | None = None, use_mirroring: bool = True, tile_step_size: float = 0.5):
    """An initialised ``nnUNetPredictor`` holding the folds' weights."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samunet.registry import TRAINERS
    from samunet.trainers.base import check_network_fits

    trainer_class = TRAINERS.get(trainer_name)
    folder = model_folder(dataset_name, trainer_name, plans_identifier, configuration)
    if not (folder / "plans.json").is_file():
        raise DatasetError(f"no trained model in {folder}; train it with samunet_train first")
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans_manager = PlansManager(plans)
    configuration_manager = trainer_class.inference_configuration(plans_manager.get_configuration(configuration))
    num_input_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_outputs, enable_deep_supervision=False)
    checkpoints = load_fold_checkpoints(folder, folds, checkpoint_name, trainer_name)
    for checkpoint in checkpoints:
        check_network_fits(checkpoint.get("samunet", {}), network, str(checkpoint["path"]))
    device = select_device(device)
    predictor = trainer_class.predictor_class()(
        tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
        perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
        verbose_preprocessing=False, allow_tqdm=False)
    mirroring = checkpoints[0].get("inference_allowed_mirroring_axes")
    predictor.manual_initialization(network.to(device), plans_manager, configuration_manager,
                                    [c["network_weights"] for c in checkpoints], dataset_json, trainer_name,
                                    tuple(mirroring) if mirroring is not None else None)
    return predictor


def input_cases(input_folder: Path, dataset_json: dict) -> list[list[str]]:
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    if not input_folder.is_dir():
        raise DatasetError(f"input folder {input_folder} does not exist")
    ending = dataset_json["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(str(input_folder), ending)
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if not cases:
        raise DatasetError(f"{input_folder} holds no images named CASE_XXXX{ending} (nnU-Net's naming, "
                           f"one file per channel, e.g. case_001_0000{ending})")
    incomplete = [os.path.basename(c[0]) for c in cases if len(c) != channels]
    if incomplete:
        raise DatasetError(f"{len(incomplete)} case(s) in {input_folder} lack channels (need {channels}): "
                           f"{incomplete[:5]}")
    return cases


def predict_folder(predictor, input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                   save_probabilities: bool = False) -> list[Path]:
    """Predict every case in ``input_folder`` into ``output_folder``; returns the written label maps.

    With ``save_probabilities`` each case's softmax probabilities (``CASE.npz``) and geometry
    (``CASE.pkl``) are written too, with the model's ``dataset.json`` and ``plans.json``, so that
    ``samunet_ensemble`` can average several such folders.
    """
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    input_folder, output_folder = Path(input_folder), Path(output_folder)
    dataset_json = predictor.dataset_json
    ending = dataset_json["file_ending"]
    cases = input_cases(input_folder, dataset_json)
    output_folder.mkdir(parents=True, exist_ok=True)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    written = []
    with tempfile.TemporaryDirectory(prefix=".partial_", dir=output_folder) as scratch:
        for files in tqdm(cases, desc="predicting", unit="case"):
            name = os.path.basename(files[0])[:-len(ending) - len("_0000")]
            data, _, properties = preprocessor.run_case(files, None, predictor.plans_manager,
                                                        predictor.configuration_manager, dataset_json)
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
            export_prediction_from_logits(logits, properties, predictor.configuration_manager,
                                          predictor.plans_manager, dataset_json, os.path.join(scratch, name),
                                          save_probabilities=save_probabilities)
        if save_probabilities:
            for produced in sorted([*Path(scratch).glob("*.npz"), *Path(scratch).glob("*.pkl")]):
                shutil.move(str(produced), output_folder / produced.name)
            (output_folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
            (output_folder / "plans.json").write_text(json.dumps(predictor.plans_manager.plans, indent=2))
        for produced in sorted(Path(scratch).glob(f"*{ending}")):
            target = output_folder / produced.name
            shutil.move(str(produced), target)
            written.append(target)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samunet_predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", required=True, help="folder with images named CASE_XXXX.nii.gz")
    parser.add_argument("-o", "--output", required=True, help="folder for the label maps")
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name the model was trained on")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-tr", "--trainer", default="SAMedTrainer")
    parser.add_argument("-p", "--plans", default="samunetPlans")
    parser.add_argument("-f", "--folds", nargs="+", type=parse_fold, default=[0, 1, 2, 3, 4])
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("--classes", help="comma-separated class names or label values to predict "
                                          "(class-prompted trainers such as AutoMedSAMTrainer); default: all")
    parser.add_argument("--step-size", type=float, default=0.5, help="sliding-window step as a patch fraction")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write CASE.npz/.pkl softmax probabilities (input for samunet_ensemble)")
    add_common_arguments(parser)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    prepare_environment()
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    dataset_name = resolve_dataset_name(args.dataset)
    predictor = build_predictor(dataset_name, args.configuration, args.trainer, args.folds,
                                plans_identifier=args.plans, checkpoint_name=args.checkpoint, device=args.device,
                                use_mirroring=not args.disable_tta, tile_step_size=args.step_size)
    if args.classes:
        if not hasattr(predictor.network, "set_predict_classes"):
            raise ConfigurationError(f"{args.trainer} predicts all classes at once; --classes needs a "
                                     f"class-prompted trainer such as AutoMedSAMTrainer")
        from samunet.networks.automedsam import parse_class_selection
        predictor.network.set_predict_classes(parse_class_selection(args.classes, predictor.dataset_json["labels"]))
    written = predict_folder(predictor, args.input, args.output, save_probabilities=args.save_probabilities)
    logger.info("wrote %d label maps to %s", len(written), args.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
