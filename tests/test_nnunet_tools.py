"""nnunetv2's own tools on samunet models (issue 12, deliverable 6).

- ``nnUNetv2_export_model_to_zip`` / ``nnUNetv2_install_pretrained_model_from_zip`` carry a model folder
  written by ``samunet_train`` to another ``nnUNet_results``, where ``samunet_predict`` predicts the same;
- ``nnUNet_extTrainer=<samunet/trainers>`` lets nnunetv2 find every registered samunet trainer by name,
  ``nnUNetv2_train`` train one and ``nnUNetv2_predict_from_modelfolder`` predict with it (run as nnunetv2's
  console entry points, in a fresh process). nnunetv2 first looks for ``-tr`` among its own trainers, which
  imports all of them; in nnunetv2 2.8.1 the Primus trainers import timm and with it torchvision, which
  cannot be imported next to this machine's CPU torch. That first search is therefore answered with
  "not found" (what it returns where torchvision imports: nnunetv2 has no samunet trainer); the external
  search that follows is nnunetv2's own;
- ``nnUNetv2_evaluate_folder`` scores samunet_predict's output folder (it holds plans.json and dataset.json);
- ``nnUNetv2_plot_overlay_pngs`` draws samunet's preprocessed data (``-p samunetPlans -c 2d``), and its
  ``plot_overlay`` draws a samunet prediction on its image.

The model is the tiny phantom data set (``tiny_dataset_root``) trained for one short epoch; this module
writes its models into its own ``nnUNet_results``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import SimpleITK as sitk

import samunet.trainers
from samunet.cli.predict import main as predict_main
from samunet.cli.train import train

pytestmark = pytest.mark.slow

DATASET = "Dataset991_PhantomTiny"
MODEL = "SAMedTrainer__samunetPlans__2d"
TINY_RUN = {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "batch_size": 2}
SAMUNET_TRAINERS = Path(samunet.trainers.__file__).parent
NNUNET_BIN = Path(sys.executable).parent


def label_maps(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def samunet_predict(images: Path, output: Path, *model: str) -> dict[str, np.ndarray]:
    assert predict_main(["-i", str(images), "-o", str(output), *model, "--disable_tta", "-device", "cpu",
                         "-npp", "0", "-nps", "0", "--disable_progress_bar"]) == 0
    return label_maps(output)


def run_command(*command: str | Path) -> None:
    """An nnunetv2 console script of this environment, with its output shown if it fails."""
    done = subprocess.run([str(NNUNET_BIN / str(command[0])), *map(str, command[1:])], capture_output=True, text=True)
    assert done.returncode == 0, f"{command[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def colored(png: Path) -> np.ndarray:
    """Pixels nnunetv2's overlay coloured: the image is grey (R = G = B), labels add a colour."""
    rgb = plt.imread(str(png))[..., :3]
    return ~((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2]))


@pytest.fixture(scope="module")
def folders(tiny_dataset_root, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny phantom (raw, preprocessed) with this module's own nnUNet_results, set in the
    environment while the module runs."""
    values = {"nnUNet_raw": tiny_dataset_root / "nnUNet_raw",
              "nnUNet_preprocessed": tiny_dataset_root / "nnUNet_preprocessed",
              "nnUNet_results": tmp_path_factory.mktemp("nnunet_tools_results")}
    with pytest.MonkeyPatch.context() as patch:
        for name, folder in values.items():
            patch.setenv(name, str(folder))
        yield values


@pytest.fixture(scope="module")
def samunet_model(folders, tmp_path_factory) -> dict[str, Path]:
    """A model folder written by samunet_train (fold 0) and samunet_predict's output on imagesTs."""
    import random

    import torch
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # the same short run, and predictions, every time
    trainer = train(991, "2d", 0, "SAMedTrainer", device="cpu", hyperparameters=dict(TINY_RUN))
    images = folders["nnUNet_raw"] / DATASET / "imagesTs"
    prediction = tmp_path_factory.mktemp("samunet_prediction")
    samunet_predict(images, prediction, "-d", "991", "-tr", "SAMedTrainer", "-f", "0")
    return {"folder": Path(trainer.output_folder).parent, "prediction": prediction, "images": images}


def test_a_samunet_model_round_trips_through_nnunetv2_model_zip_and_predicts_the_same(
        samunet_model, tmp_path, monkeypatch):
    """nnUNetv2_export_model_to_zip -d 991 -c 2d -tr SAMedTrainer -p samunetPlans -f 0, then
    nnUNetv2_install_pretrained_model_from_zip into an empty nnUNet_results: samunet_predict by name
    (-d/-tr) and by folder (-m) writes the label maps it wrote before the export."""
    archive = tmp_path / "model.zip"
    run_command("nnUNetv2_export_model_to_zip", "-d", "991", "-o", archive, "-c", "2d", "-tr", "SAMedTrainer",
                "-p", "samunetPlans", "-f", "0")
    with zipfile.ZipFile(archive) as content:
        names = set(content.namelist())
    assert {f"{DATASET}/{MODEL}/{name}" for name in (
        "plans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pth",
        "fold_0/progress.png", "fold_0/validation/summary.json", "fold_0/debug.json")} <= names

    # another machine: only the installed model, no raw or preprocessed data set
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    other_results = tmp_path / "nnUNet_results"
    run_command("nnUNetv2_install_pretrained_model_from_zip", archive)
    installed = other_results / DATASET / MODEL
    assert (installed / "fold_0" / "checkpoint_final.pth").is_file()

    expected = label_maps(samunet_model["prediction"])
    assert expected and any(labels.any() for labels in expected.values())
    by_name = samunet_predict(samunet_model["images"], tmp_path / "by_name", "-d", "991", "-tr", "SAMedTrainer",
                              "-f", "0")
    by_folder = samunet_predict(samunet_model["images"], tmp_path / "by_folder", "-m", str(installed), "-f", "0")
    for predicted in (by_name, by_folder):
        assert predicted.keys() == expected.keys()
        for name, labels in expected.items():
            np.testing.assert_array_equal(predicted[name], labels, err_msg=name)


def test_nnunetv2_finds_every_samunet_trainer_through_nnUNet_extTrainer(monkeypatch):
    """nnunetv2's recursive_find_trainer_class_by_name with nnUNet_extTrainer=<samunet/trainers> returns, for
    every registered name, an nnUNetTrainer of that name configured as samunet's registered class (a copy
    imported from its file); importing samunet's trainer files again raises nothing."""
    from nnunetv2.utilities import find_objects

    from samunet.registry import TRAINERS
    nnunetv2_search = find_objects.recursive_find_python_class

    def search(folder, class_name, current_module, *args, **kwargs):
        if current_module == "nnunetv2.training.nnUNetTrainer":
            return None  # nnunetv2's own trainers import torchvision, which this machine cannot
        return nnunetv2_search(folder, class_name, current_module, *args, **kwargs)

    monkeypatch.setattr(find_objects, "recursive_find_python_class", search)
    monkeypatch.setenv("nnUNet_extTrainer", str(SAMUNET_TRAINERS))
    names = TRAINERS.names()
    for name in names:
        registered, found = TRAINERS.get(name), find_objects.recursive_find_trainer_class_by_name(name)
        assert found.__name__ == name and found is not registered
        assert [c.__qualname__ for c in found.__mro__] == [c.__qualname__ for c in registered.__mro__]
        for attribute in ("network_class", "network_kwargs", "default_hyperparameters", "optimizer_name",
                          "uses_deep_supervision"):
            assert getattr(found, attribute) == getattr(registered, attribute), (name, attribute)
        assert found.predictor_class() is registered.predictor_class()
    assert TRAINERS.names() == names


NNUNET_COMMANDS = '''
"""nnUNetv2_train, then nnUNetv2_predict_from_modelfolder, as their console entry points run them."""
import json, sys

from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder
from nnunetv2.run import run_training
from nnunetv2.utilities import find_objects

arguments = json.loads(sys.argv[1])
nnunetv2_search = find_objects.recursive_find_python_class
found = []


def search(folder, class_name, current_module, *args, **kwargs):
    if current_module == "nnunetv2.training.nnUNetTrainer":
        return None  # nnunetv2's own trainers (they import torchvision, which this machine cannot)
    result = nnunetv2_search(folder, class_name, current_module, *args, **kwargs)
    found.append({"name": class_name, "folder": folder, "module": getattr(result, "__module__", None),
                  "mro": [f"{c.__module__}.{c.__qualname__}" for c in getattr(result, "__mro__", ())]})
    return result


find_objects.recursive_find_python_class = search
nnunetv2_get_trainer = run_training.get_trainer_from_args


def get_trainer_from_args(*args, **kwargs):
    trainer = nnunetv2_get_trainer(*args, **kwargs)
    trainer.set_hyperparameters(arguments["hyperparameters"])  # a short run instead of 1000 epochs
    return trainer


run_training.get_trainer_from_args = get_trainer_from_args
sys.argv = ["nnUNetv2_train", *arguments["train"]]
run_training.run_training_entry()
sys.argv = ["nnUNetv2_predict_from_modelfolder", *arguments["predict"]]
predict_entry_point_modelfolder()
print("FOUND " + json.dumps(found))
'''


@pytest.fixture(scope="module")
def nnunet_commands_model(folders, tmp_path_factory) -> dict:
    """nnUNet_extTrainer=<samunet/trainers>: nnUNetv2_train 991 2d 1 -tr SAMedTrainer -p samunetPlans -device cpu
    (one short epoch), then nnUNetv2_predict_from_modelfolder -m MODEL -f 1 on imagesTs, in a fresh process
    that has imported nothing of samunet before nnunetv2 searches for the trainer."""
    folder = folders["nnUNet_results"] / DATASET / MODEL
    images = folders["nnUNet_raw"] / DATASET / "imagesTs"
    prediction = tmp_path_factory.mktemp("nnunet_prediction")
    arguments = {
        "hyperparameters": TINY_RUN,
        "train": ["991", "2d", "1", "-tr", "SAMedTrainer", "-p", "samunetPlans", "-device", "cpu"],
        "predict": ["-i", str(images), "-o", str(prediction), "-m", str(folder), "-f", "1", "--disable_tta",
                    "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]}
    environment = {**os.environ, "nnUNet_extTrainer": str(SAMUNET_TRAINERS)}
    done = subprocess.run([sys.executable, "-c", NNUNET_COMMANDS, json.dumps(arguments)], env=environment,
                          capture_output=True, text=True, cwd=tmp_path_factory.mktemp("cwd"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.rsplit("FOUND ", 1)[1])
    return {"folder": folder, "fold": folder / "fold_1", "prediction": prediction, "images": images,
            "found": found}


def test_nnunetv2_train_finds_a_samunet_trainer_through_nnUNet_extTrainer_and_trains_it(nnunet_commands_model):
    """The fold nnUNetv2_train wrote is a samunet model: final checkpoint (weights only, samunet's metadata),
    progress plot and the final validation's summary."""
    import torch
    # nnUNetv2_train and nnUNetv2_predict_from_modelfolder each found samunet's class in samunet/trainers
    # (imported by its file name, after samunet's other trainer files: none of them was "registered twice")
    assert len(nnunet_commands_model["found"]) == 2
    for found in nnunet_commands_model["found"]:
        assert found["folder"] == str(SAMUNET_TRAINERS) and found["module"] == "samed"
        assert found["mro"][:2] == ["samed.SAMedTrainer", "samunet.trainers.base.SAMTrainerBase"]
        assert "nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer" in found["mro"]
    fold = nnunet_commands_model["fold"]
    for name in ("checkpoint_final.pth", "progress.png", "validation/summary.json"):
        assert (fold / name).is_file(), name
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["trainer_name"] == "SAMedTrainer" and checkpoint["current_epoch"] == 1
    assert checkpoint["samunet"]["backbone"] == "vit_test"


def test_nnunetv2_predict_from_modelfolder_predicts_what_samunet_predict_does(nnunet_commands_model, tmp_path):
    """nnUNetv2_predict_from_modelfolder's label maps equal samunet_predict -m's for the same model and fold."""
    expected = samunet_predict(nnunet_commands_model["images"], tmp_path / "samunet",
                               "-m", str(nnunet_commands_model["folder"]), "-f", "1")
    predicted = label_maps(nnunet_commands_model["prediction"])
    assert predicted.keys() == expected.keys() and expected
    for name, labels in expected.items():
        np.testing.assert_array_equal(predicted[name], labels, err_msg=name)


def dice(reference: np.ndarray, prediction: np.ndarray, label: int) -> float:
    ref, pred = reference == label, prediction == label
    total = ref.sum() + pred.sum()
    return float("nan") if total == 0 else 2 * float((ref & pred).sum()) / float(total)


def test_nnunetv2_evaluate_folder_scores_a_samunet_predict_output_folder(samunet_model, folders, tmp_path,
                                                                           monkeypatch):
    """nnUNetv2_evaluate_folder labelsTs PRED -djfile PRED/dataset.json -pfile PRED/plans.json: samunet_predict
    writes both files next to the label maps."""
    from nnunetv2.evaluation.evaluate_predictions import evaluate_folder_entry_point, load_summary_json
    prediction, labels = samunet_model["prediction"], folders["nnUNet_raw"] / DATASET / "labelsTs"
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_evaluate_folder", str(labels), str(prediction),
                                      "-djfile", str(prediction / "dataset.json"),
                                      "-pfile", str(prediction / "plans.json"),
                                      "-o", str(tmp_path / "summary.json"), "-np", "1"])
    evaluate_folder_entry_point()
    summary = load_summary_json(str(tmp_path / "summary.json"))
    assert len(summary["metric_per_case"]) == 2
    for case in summary["metric_per_case"]:
        reference = sitk.GetArrayFromImage(sitk.ReadImage(case["reference_file"]))
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(case["prediction_file"]))
        assert Path(case["prediction_file"]).parent == prediction
        assert sorted(case["metrics"]) == [1, 2, 3]
        for label, metrics in case["metrics"].items():
            assert metrics["n_pred"] == int((predicted == label).sum())
            np.testing.assert_allclose(metrics["Dice"], dice(reference, predicted, label), equal_nan=True)


def test_nnunetv2_plot_overlay_pngs_draws_samunet_preprocessed_data(folders, tmp_path, monkeypatch):
    """nnUNetv2_plot_overlay_pngs -d 991 -p samunetPlans -c 2d: one png per training case, coloured exactly
    where the preprocessed segmentation of the slice it picks has foreground."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.overlay_plots import entry_point_generate_overlay, select_slice_to_plot2
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_plot_overlay_pngs", "-d", "991", "-o", str(tmp_path), "-np", "1",
                                      "-p", "samunetPlans", "-c", "2d"])
    entry_point_generate_overlay()
    preprocessed = folders["nnUNet_preprocessed"] / DATASET / "samunetPlans_2d"
    dataset = infer_dataset_class(str(preprocessed))(str(preprocessed))
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(dataset.identifiers) and dataset.identifiers
    for case in dataset.identifiers:
        data, seg, _, _ = dataset.load_case(case)
        selected = select_slice_to_plot2(data[0], seg[0])
        foreground = seg[0][selected] > 0
        assert foreground.any()
        np.testing.assert_array_equal(colored(tmp_path / f"{case}.png"), foreground, err_msg=case)


def test_nnunetv2_plot_overlay_draws_a_samunet_prediction_on_its_image(samunet_model, tmp_path):
    """nnunetv2's plot_overlay (what nnUNetv2_plot_overlay_pngs runs per case) on an input image and
    samunet_predict's label map for it: same geometry, coloured exactly where the label map has foreground."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.overlay_plots import plot_overlay, select_slice_to_plot2
    for label_file in sorted(samunet_model["prediction"].glob("*.nii.gz")):
        image_file = samunet_model["images"] / label_file.name.replace(".nii.gz", "_0000.nii.gz")
        plot_overlay(str(image_file), str(label_file), SimpleITKIO(), str(tmp_path / "overlay.png"))
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file)))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
        foreground = labels[select_slice_to_plot2(image, labels)] > 0
        assert foreground.any()
        np.testing.assert_array_equal(colored(tmp_path / "overlay.png"), foreground, err_msg=label_file.name)

