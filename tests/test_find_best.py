"""samunet_find_best on miniature five-fold results folders (with validation probabilities), and nnU-Net's
connected-component postprocessing it determines (samunet_apply_postprocessing applies it)."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.find_best import main

DATASET = "Dataset124_Tiny"
LABELS = {"background": 0, "liver": 1, "kidney": 2}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 6, "file_ending": ".nii.gz"}
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "configurations": {"2d": {}}}
CASES = [f"case_{i}" for i in range(6)]
SPLITS = [{"train": [c for c in CASES if c not in val], "val": val}
          for val in (CASES[0:2], CASES[2:3], CASES[3:4], CASES[4:5], CASES[5:6])]
PROPERTIES = {"sitk_stuff": {"spacing": (1.5, 1.5, 3.0), "origin": (0.0, 0.0, 0.0),
                             "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}}


def _label_map(shift=0, stray_liver=False):
    array = np.zeros((4, 16, 16), dtype=np.uint8)
    array[1:3, 2:8, 2 + shift:8 + shift] = 1
    array[1:3, 10:14, 10:14] = 2
    if stray_liver:  # a small liver component far from the liver (what keeping the largest component removes)
        array[3, 14:16, 0:2] = 1
    return array


def _write(array, path):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(path))


def _probabilities(labels, weight):
    probabilities = np.full((3, *labels.shape), (1 - weight) / 2, dtype=np.float32)
    for value in range(3):
        probabilities[value][labels == value] = weight
    return probabilities


def _model(results, trainer, wrong_case, weight, npz=True, plans="samunetPlans", stray=()):
    """Five folds whose validation is perfect except ``wrong_case`` (liver shifted, confidence ``weight``)
    and the cases in ``stray`` (a stray liver component)."""
    model = results / DATASET / f"{trainer}__{plans}__2d"
    model.mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (model / "plans.json").write_text(json.dumps(PLANS))
    for fold, split in enumerate(SPLITS):
        validation = model / f"fold_{fold}" / "validation"
        validation.mkdir(parents=True)
        (model / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
        for case in split["val"]:
            labels = _label_map(2 if case == wrong_case else 0, stray_liver=case in stray)
            _write(labels, validation / f"{case}.nii.gz")
            if npz:
                np.savez_compressed(validation / f"{case}.npz",
                                    probabilities=_probabilities(labels, weight if case == wrong_case else 0.9))
                (validation / f"{case}.pkl").write_bytes(pickle.dumps(PROPERTIES))
    return model


@pytest.fixture
def results(nnunet_folders):
    (nnunet_folders["nnUNet_raw"] / DATASET).mkdir()
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / DATASET
    (preprocessed / "gt_segmentations").mkdir(parents=True)
    (preprocessed / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (preprocessed / "splits_final.json").write_text(json.dumps(SPLITS))
    for plans in ("samunetPlans", "otherPlans"):
        (preprocessed / f"{plans}.json").write_text(json.dumps(PLANS))
    for case in CASES:
        _write(_label_map(), preprocessed / "gt_segmentations" / f"{case}.nii.gz")
    return nnunet_folders["nnUNet_results"]


def test_best_single_model_from_computed_and_stored_summaries(results, capsys):
    _model(results, "SAMedTrainer", "case_0", 0.6)
    stored = _model(results, "HSAMTrainer", "case_1", 0.6)
    (stored / "cv_summary_samunet.json").write_text(json.dumps({"overall": {"Dice": {"mean": 0.5}}}))
    assert main(["-d", "124", "-tr", "SAMedTrainer", "HSAMTrainer", "--disable_ensembling"]) == 0
    ranking = json.loads((results / DATASET / "find_best_samunet.json").read_text())
    names = [entry["name"] for entry in ranking["ranking"]]
    assert names == ["SAMedTrainer__samunetPlans__2d", "HSAMTrainer__samunetPlans__2d"]
    liver = (4 / 6 + 5) / 6
    assert ranking["best"]["foreground_dice"] == pytest.approx((liver + 1) / 2)
    assert (results / DATASET / "SAMedTrainer__samunetPlans__2d" / "cv_summary_samunet.json").is_file()
    out = capsys.readouterr().out
    assert "samunet_predict -d 124 -i INPUT_FOLDER -o OUTPUT_FOLDER -f 0 1 2 3 4 -tr SAMedTrainer -c 2d " \
           "-p samunetPlans" in out
    assert "samunet_ensemble" not in out


def test_an_ensemble_that_fixes_both_models_wins(results, capsys):
    _model(results, "SAMedTrainer", "case_0", 0.6)
    _model(results, "HSAMTrainer", "case_1", 0.6)
    _model(results, "HSPSAMTrainer", "case_2", 0.6, npz=False)
    assert main(["124", "-tr", "SAMedTrainer", "HSAMTrainer", "HSPSAMTrainer"]) == 0  # ensembling is the default
    ranking = json.loads((results / DATASET / "find_best_samunet.json").read_text())
    best = ranking["best"]
    assert best["members"] == ["SAMedTrainer__samunetPlans__2d", "HSAMTrainer__samunetPlans__2d"]
    assert best["foreground_dice"] == pytest.approx(1.0)
    assert best["name"] == "ensemble___SAMedTrainer__samunetPlans__2d___HSAMTrainer__samunetPlans__2d___0_1_2_3_4"
    assert len(ranking["ranking"]) == 4 and "HSPSAMTrainer__samunetPlans__2d" in ranking["left_out_of_ensembles"]
    assert (results / DATASET / "ensembles" / best["name"] / "case_0.nii.gz").is_file()
    out = capsys.readouterr().out
    assert "-tr SAMedTrainer -c 2d -p samunetPlans --save_probabilities" in out
    assert "samunet_ensemble -i OUTPUT_FOLDER_MODEL_1 OUTPUT_FOLDER_MODEL_2 -o OUTPUT_FOLDER" in out
    assert "not ensembled: HSPSAMTrainer" in out and "--npz" in out


def test_several_configurations_plans_and_a_subset_of_folds(results, capsys):
    """nnU-Net's -c/-p lists (every combination; a configuration the plans lack is left out) and -f."""
    _model(results, "SAMedTrainer", "case_0", 0.6)
    _model(results, "SAMedTrainer", "case_3", 0.6, plans="otherPlans")
    assert main(["124", "-tr", "SAMedTrainer", "-c", "2d", "3d_fullres", "-p", "samunetPlans", "otherPlans",
                 "-f", "0", "1"]) == 0
    ranking = json.loads((results / DATASET / "find_best_samunet.json").read_text())
    assert ranking["considered_models"] == ["SAMedTrainer__samunetPlans__2d", "SAMedTrainer__otherPlans__2d"]
    assert len(ranking["left_out_models"]) == 2 and all("3d_fullres" in n for n in ranking["left_out_models"])
    # folds 0 and 1 validate case_0..case_2: only samunetPlans's case_0 is wrong there
    assert ranking["best"]["name"] == "SAMedTrainer__otherPlans__2d"
    assert ranking["best"]["foreground_dice"] == pytest.approx(1.0)
    merged = results / DATASET / "SAMedTrainer__otherPlans__2d" / "crossval_results_folds_0_1"
    assert sorted(p.name for p in merged.glob("*.nii.gz")) == ["case_0.nii.gz", "case_1.nii.gz", "case_2.nii.gz"]
    assert "ensemble___SAMedTrainer__samunetPlans__2d___SAMedTrainer__otherPlans__2d___0_1" in \
        [entry["name"] for entry in ranking["ranking"]]


def test_missing_model_is_a_one_line_error(results, capsys):
    _model(results, "SAMedTrainer", "case_0", 0.6)
    assert main(["-d", "124", "-tr", "SAMedTrainer", "HSAMTrainer"]) == 2
    message = capsys.readouterr().err
    assert "HSAMTrainer__samunetPlans__2d" in message and "samunet_train_cv" in message


def test_the_dataset_is_named_once(results, capsys):
    assert main(["124", "-d", "124", "-tr", "SAMedTrainer"]) == 2
    assert "name the dataset once" in capsys.readouterr().err


# ---- postprocessing -------------------------------------------------------------------------------------
def test_postprocessing_is_determined_on_the_winner_and_applied_by_one_command(results, tmp_path, capsys):
    """A stray liver component in 3 of 6 validation cases: keeping the largest foreground component would
    delete the kidney (a class gets worse: not adopted, nnU-Net's rule), keeping liver's largest component
    helps liver (adopted), kidney's changes nothing (not adopted)."""
    from samunet.cli.postprocessing import main_apply
    from samunet.evaluation.postprocessing import load_postprocessing
    _model(results, "SAMedTrainer", None, 0.6, stray=("case_0", "case_2", "case_4"))
    assert main(["124", "-tr", "SAMedTrainer"]) == 0
    merged = results / DATASET / "SAMedTrainer__samunetPlans__2d" / "crossval_results_folds_0_1_2_3_4"
    functions, kwargs = load_postprocessing(merged / "postprocessing.pkl")
    assert [f.__name__ for f in functions] == ["remove_all_but_largest_component_from_segmentation"]
    assert kwargs == [{"labels_or_regions": 1}]
    record = json.loads((merged / "postprocessing.json").read_text())
    assert record["input_folder"]["mean"]["1"]["Dice"] < 1.0 == record["postprocessed"]["mean"]["1"]["Dice"]
    assert record["postprocessed"]["mean"]["2"]["Dice"] == 1.0
    ranking = json.loads((results / DATASET / "find_best_samunet.json").read_text())
    assert ranking["postprocessing"]["file"] == str(merged / "postprocessing.pkl")
    assert ranking["postprocessing"]["nnunet_foreground_dice_after"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("samunet_apply_postprocessing"))
    assert f"-pp_pkl_file {merged / 'postprocessing.pkl'}" in command and "-plans_json" in command
    instructions = (results / DATASET / "inference_instructions_samunet.txt").read_text()
    assert command in instructions and "samunet_predict" in instructions
    # the printed command, with the prediction folders filled in, postprocesses new predictions
    predictions = tmp_path / "pred"
    predictions.mkdir()
    _write(_label_map(stray_liver=True), predictions / "case_9.nii.gz")
    (predictions / "plans.json").write_text(json.dumps(PLANS))
    (predictions / "dataset.json").write_text(json.dumps(DATASET_JSON))
    arguments = command.split()[1:]
    arguments[arguments.index("OUTPUT_FOLDER")] = str(predictions)
    arguments[arguments.index("OUTPUT_FOLDER_PP")] = str(tmp_path / "pp")
    assert main_apply(arguments) == 0
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pp" / "case_9.nii.gz")))
    assert np.array_equal(result, _label_map()) and not np.array_equal(result, _label_map(stray_liver=True))


def test_a_postprocessing_file_that_would_run_other_code_is_refused(tmp_path, capsys):
    from samunet.cli.postprocessing import main_apply
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(([print], [{}])))
    (tmp_path / "pred").mkdir()
    assert main_apply(["-i", str(tmp_path / "pred"), "-o", str(tmp_path / "pp"), "-pp_pkl_file",
                       str(tmp_path / "evil.pkl")]) == 2
    assert "builtins.print" in capsys.readouterr().err


def _touching_organs(stray_liver: int = 0, small_kidney: bool = True) -> np.ndarray:
    """Liver and kidney touching (one foreground component), a small separate true kidney part, and
    optionally ``stray_liver`` voxels of a wrong liver component far away."""
    array = np.zeros((4, 16, 16), dtype=np.uint8)
    array[1:3, 2:8, 2:8] = 1
    array[1:3, 8:12, 2:8] = 2
    if small_kidney:
        array[3, 14:16, 14:16] = 2
    if stray_liver:
        array[3, 0:4, 14:16][:stray_liver // 2] = 1
    return array


@pytest.fixture
def postprocessing_folders(tmp_path):
    """References and predictions where keeping the largest foreground component raises the foreground
    Dice (a stray liver part goes) but lowers kidney's (its small true part goes too)."""
    references, predictions = tmp_path / "ref", tmp_path / "pred"
    references.mkdir()
    predictions.mkdir()
    for case in ("case_0", "case_1", "case_2"):  # the small kidney part only in case_0, the stray liver in all
        _write(_touching_organs(small_kidney=case == "case_0"), references / f"{case}.nii.gz")
        _write(_touching_organs(stray_liver=8, small_kidney=case == "case_0"), predictions / f"{case}.nii.gz")
    return references, predictions


def test_keeping_the_largest_foreground_is_refused_when_a_class_gets_worse(postprocessing_folders):
    """nnU-Net's rules: step 1 needs a higher foreground Dice AND no class worse; step 2 per label."""
    from samunet.evaluation.postprocessing import determine_postprocessing
    references, predictions = postprocessing_folders
    functions, kwargs = determine_postprocessing(predictions, references, PLANS, DATASET_JSON)
    assert kwargs == [{"labels_or_regions": 1}] and len(functions) == 1
    record = json.loads((predictions / "postprocessing.json").read_text())
    assert record["postprocessed"]["mean"]["1"]["Dice"] == 1.0 > record["input_folder"]["mean"]["1"]["Dice"]
    assert record["postprocessed"]["mean"]["2"]["Dice"] == 1.0  # the small true kidney part was kept
    # keeping the largest foreground component alone would have raised the foreground Dice
    from samunet.evaluation.postprocessing import apply_postprocessing_to_folder
    from nnunetv2.postprocessing.remove_connected_components import \
        remove_all_but_largest_component_from_segmentation as keep_largest
    apply_postprocessing_to_folder(predictions, predictions.parent / "fg", [keep_largest],
                                   [{"labels_or_regions": [1, 2]}], PLANS, DATASET_JSON)
    kept = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions.parent / "fg" / "case_0.nii.gz")))
    assert not (kept[3, 14:16, 14:16] == 2).any()
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from samunet.evaluation.postprocessing import folder_metrics
    whole = folder_metrics(references, predictions.parent / "fg", None, SimpleITKIO(), ".nii.gz", [1, 2], None)
    assert whole["foreground_mean"]["Dice"] > record["input_folder"]["foreground_mean"]["Dice"]
    assert whole["mean"][2]["Dice"] < 1.0


def test_the_decision_and_its_files_are_nnunetv2s(postprocessing_folders, tmp_path):
    """Same decision, same postprocessing.json and postprocessed files as nnunetv2's own
    determine_postprocessing on the same predictions."""
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing as nnunet_determine

    from samunet.evaluation.postprocessing import determine_postprocessing
    references, predictions = postprocessing_folders
    theirs = tmp_path / "theirs"
    shutil.copytree(predictions, theirs)
    decided = determine_postprocessing(predictions, references, PLANS, DATASET_JSON, num_processes=1)
    expected = nnunet_determine(str(theirs), str(references), PLANS, DATASET_JSON, num_processes=1)
    assert decided[1] == expected[1] and [f.__name__ for f in decided[0]] == [f.__name__ for f in expected[0]]
    assert json.loads((predictions / "postprocessing.json").read_text()) == \
        json.loads((theirs / "postprocessing.json").read_text())
    for path in (theirs / "postprocessed").glob("*.nii.gz"):
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / "postprocessed" / path.name)))
        assert np.array_equal(ours, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
