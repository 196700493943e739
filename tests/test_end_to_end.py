"""plan -> train -> predict -> evaluate on a tiny phantom with a tiny random backbone, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from samunet.cli.evaluate import main as evaluate_main
from samunet.cli.predict import build_predictor, main as predict_main, predict_folder
from samunet.cli.train import train
from samunet.trainers.base import CheckpointMismatchError
from trainer_harness import nnunet_environment

DATASET = "Dataset991_PhantomTiny"
TINY_RUN = {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "batch_size": 2}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_fold0(tiny_dataset_root):
    with nnunet_environment(tiny_dataset_root):
        trainer = train(991, "2d", 0, "SAMedTrainer", device="cpu", hyperparameters=dict(TINY_RUN))
    return Path(trainer.output_folder)


def test_training_writes_nnunet_outputs_and_a_weights_only_checkpoint(trained_fold0):
    for name in ("checkpoint_final.pth", "progress.png", "validation/summary.json", "debug.json"):
        assert (trained_fold0 / name).is_file(), name
    assert list(trained_fold0.glob("training_log_*.txt"))
    assert not list(trained_fold0.glob(".partial_*"))
    checkpoint = torch.load(trained_fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["trainer_name"] == "SAMedTrainer" and checkpoint["current_epoch"] == 1
    assert checkpoint["samunet"]["backbone"] == "vit_test" and checkpoint["samunet"]["img_size"] == 64
    assert checkpoint["samunet"]["hyperparameters"]["num_iterations_per_epoch"] == 3
    assert trained_fold0.parent.name == "SAMedTrainer__samunetPlans__2d"


def test_prediction_keeps_case_names_and_original_geometry(trained_fold0, planned_tiny_dataset, tmp_path):
    raw = planned_tiny_dataset["nnUNet_raw"] / DATASET
    predictor = build_predictor(DATASET, "2d", "SAMedTrainer", [0], device="cpu", use_mirroring=False)
    written = predict_folder(predictor, raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in written) == sorted(p.name for p in (raw / "labelsTs").iterdir())
    for label_file in (raw / "labelsTs").iterdir():
        reference = sitk.ReadImage(str(label_file))
        prediction = sitk.ReadImage(str(tmp_path / "pred" / label_file.name))
        assert prediction.GetSize() == reference.GetSize()
        assert prediction.GetSpacing() == pytest.approx(reference.GetSpacing())
        assert set(sitk.GetArrayFromImage(prediction).ravel()) <= {0, 1, 2, 3}
    assert not [p for p in (tmp_path / "pred").iterdir() if p.name.startswith(".partial")]


def test_predict_and_evaluate_commands_run_end_to_end(trained_fold0, planned_tiny_dataset, tmp_path):
    raw = planned_tiny_dataset["nnUNet_raw"] / DATASET
    assert predict_main(["-i", str(raw / "imagesTs"), "-o", str(tmp_path / "pred"), "-d", "991", "-c", "2d",
                         "-tr", "SAMedTrainer", "-f", "fold0", "--disable-tta", "-device", "cpu"]) == 0
    assert evaluate_main(["-ref", str(raw / "labelsTs"), "-pred", str(tmp_path / "pred"), "-d", "991"]) == 0
    summary = json.loads((tmp_path / "pred" / "summary_samunet.json").read_text())
    assert set(summary["per_case"]) == {"case_0005", "case_0006"}
    assert {"Dice", "NSD", "HD95"} <= set(summary["foreground_mean"])


def test_continue_restores_hyperparameters_and_trains_on(trained_fold0, planned_tiny_dataset):
    trainer = train(991, "2d", 0, "SAMedTrainer", device="cpu", continue_training=True,
                    hyperparameters={"num_epochs": 2})
    assert trainer.current_epoch == 2
    assert trainer.num_iterations_per_epoch == 3  # restored from the checkpoint
    checkpoint = torch.load(trained_fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["current_epoch"] == 2


def test_a_checkpoint_of_another_backbone_is_refused(trained_fold0, planned_tiny_dataset):
    with pytest.raises(CheckpointMismatchError, match="backbone vit_test at 64 px.*tinyvit_test"):
        train(991, "2d", 0, "SAMedTrainer", device="cpu", continue_training=True, backbone="tinyvit_test",
              hyperparameters={"weights": "none"})


def test_a_tiny_trained_model_exports_a_valid_amos_submission_zip(nnunet_folders, tmp_path):
    """convert-like AMOS layout -> plan -> train -> predict -> samunet_export_submission (zip)."""
    import zipfile

    from samunet.cli.export_submission import main as export_main
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    from samunet.preprocessing.phantom import write_phantom_dataset

    name = "Dataset218_AMOS2022_postChallenge_task1"
    raw = write_phantom_dataset(nnunet_folders["nnUNet_raw"], dataset_id=218,
                                dataset_name="AMOS2022_postChallenge_task1", num_train=5, num_test=2,
                                shape=(8, 48, 48))
    for image in sorted(raw.rglob("case_*.nii.gz")):  # AMOS names its cases amos_XXXX
        image.rename(image.with_name(image.name.replace("case_", "amos_")))
    dataset_json = json.loads((raw / "dataset.json").read_text())  # AMOS22 task 1 labels 0-15
    dataset_json["labels"] = {"background": 0, **{f"organ{i}": i for i in range(1, 16)}}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    plan_and_preprocess(218, backbone="vit_test", image_size=64, num_processes=1)
    train(218, "2d", "all", "SAMedTrainer", device="cpu", hyperparameters=dict(TINY_RUN))
    predictor = build_predictor(name, "2d", "SAMedTrainer", ["all"], device="cpu", use_mirroring=False)
    predict_folder(predictor, raw / "imagesTs", tmp_path / "pred")

    assert export_main(["--challenge", "amos", "-i", str(tmp_path / "pred"), "-o", str(tmp_path / "amos.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "amos.zip") as archive:
        assert sorted(archive.namelist()) == ["results/amos_0005.nii.gz", "results/amos_0006.nii.gz"]
        archive.extractall(tmp_path / "unzipped")
    for case in ("amos_0005", "amos_0006"):
        exported = sitk.ReadImage(str(tmp_path / "unzipped" / "results" / f"{case}.nii.gz"))
        source = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
        assert exported.GetSize() == source.GetSize()
        assert exported.GetSpacing() == pytest.approx(source.GetSpacing())
