"""Tests of samunet_evaluate and samunet.evaluation.evaluate_folder on tiny NIfTI folders."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.evaluate import main
from samunet.evaluation.evaluate_folder import EvaluationError, evaluate_folders, format_table

DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "liver": 1, "kidney": 2},
    "numTraining": 2,
    "file_ending": ".nii.gz",
}
SPACING_XYZ = (1.5, 1.5, 3.0)


def _write(array, path, spacing=SPACING_XYZ, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def _label_map(shift=0):
    array = np.zeros((6, 16, 16), dtype=np.uint8)
    array[1:5, 3:9, 3 + shift:9 + shift] = 1
    array[2:4, 11:14, 11:14] = 2
    return array


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """nnU-Net folders in tmp_path with Dataset218_Tiny/dataset.json, and ref/pred folders with two cases."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    (tmp_path / "nnUNet_raw" / "Dataset218_Tiny").mkdir()
    (tmp_path / "nnUNet_raw" / "Dataset218_Tiny" / "dataset.json").write_text(json.dumps(DATASET_JSON))
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for case, shift in (("case_0000", 0), ("case_0001", 1)):
        _write(_label_map(), ref / f"{case}.nii.gz")
        _write(_label_map(shift), pred / f"{case}.nii.gz")
    return tmp_path, ref, pred


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".nii.gz"))


def test_cli_writes_json_and_markdown(folders, capsys):
    _, ref, pred = folders
    assert main(["-ref", str(ref), "-pred", str(pred), "-d", "218"]) == 0
    assert _outputs(pred) == ["summary_samunet.json", "summary_samunet.md"]
    summary = json.loads((pred / "summary_samunet.json").read_text())
    assert summary["tolerance_mm"] == 2.0
    assert set(summary["per_case"]) == {"case_0000", "case_0001"}
    assert summary["per_case"]["case_0000"]["liver"] == {"Dice": 1.0, "NSD": 1.0, "HD95": 0.0}
    assert summary["per_case"]["case_0001"]["liver"]["NSD"] == 1.0  # 1.5 mm shift, 2 mm tolerance
    assert summary["mean_per_class"]["kidney"]["Dice"] == 1.0
    assert "both_empty" in summary["empty_mask_convention"]
    table = (pred / "summary_samunet.md").read_text()
    assert "NSD@2mm" in table and "| foreground mean |" in table and "| liver |" in table
    assert "| kidney | 1.0000 | 1.0000 | 0.00 |" in capsys.readouterr().out


def test_cli_accepts_dataset_name_output_path_and_preprocessed_folder(folders):
    tmp_path, ref, pred = folders
    (tmp_path / "nnUNet_raw" / "Dataset218_Tiny").rename(tmp_path / "nnUNet_preprocessed" / "Dataset218_Tiny")
    out = tmp_path / "results" / "eval.json"
    assert main(["-ref", str(ref), "-pred", str(pred), "-d", "Dataset218_Tiny", "-o", str(out),
                 "--tolerance-mm", "1"]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file()
    summary = json.loads(out.read_text())
    assert summary["per_case"]["case_0001"]["liver"]["NSD"] < 1.0  # 1.5 mm shift, 1 mm tolerance
    assert "NSD@1mm" in out.with_suffix(".md").read_text()


def test_geometry_mismatch_is_a_clear_error_and_writes_nothing(folders, capsys):
    _, ref, pred = folders
    _write(_label_map(), pred / "case_0001.nii.gz", spacing=(1.5, 1.5, 2.0))
    assert main(["-ref", str(ref), "-pred", str(pred), "-d", "218"]) == 2
    message = capsys.readouterr().err
    assert "case case_0001" in message and "(1.5, 1.5, 2.0)" in message and "(1.5, 1.5, 3.0)" in message
    assert message.count("\n") == 1 and "Traceback" not in message
    assert _outputs(pred) == []


def test_missing_prediction_is_a_clear_error_and_writes_nothing(folders, capsys):
    _, ref, pred = folders
    (pred / "case_0001.nii.gz").unlink()
    assert main(["-ref", str(ref), "-pred", str(pred), "-d", "218"]) == 2
    message = capsys.readouterr().err
    assert "no prediction" in message and "case_0001" in message
    assert _outputs(pred) == []


def test_prediction_without_reference_is_an_error(folders):
    _, ref, pred = folders
    (ref / "case_0000.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="have no reference.*case_0000"):
        evaluate_folders(ref, pred, DATASET_JSON)


def test_unknown_dataset_is_a_one_line_error(folders, capsys):
    _, ref, pred = folders
    assert main(["-ref", str(ref), "-pred", str(pred), "-d", "219"]) == 2
    message = capsys.readouterr().err
    assert "219" in message and "nnUNet_raw=" in message and message.count("\n") == 1


def test_undefined_label_values_are_rejected(folders):
    _, ref, pred = folders
    _write(np.full((6, 16, 16), 7, dtype=np.uint8), pred / "case_0000.nii.gz")
    with pytest.raises(EvaluationError, match=r"label values \[7\]"):
        evaluate_folders(ref, pred, DATASET_JSON)


def test_parallel_evaluation_matches_serial_and_empty_classes_are_null(folders):
    _, ref, pred = folders
    labels = dict(DATASET_JSON["labels"], spleen=3)
    dataset_json = dict(DATASET_JSON, labels=labels)
    serial = evaluate_folders(ref, pred, dataset_json)
    parallel = evaluate_folders(ref, pred, dataset_json, output_json=pred / "s.json", num_processes=2)
    assert serial["mean_per_class"]["liver"] == parallel["mean_per_class"]["liver"]
    assert math.isnan(parallel["mean_per_class"]["spleen"]["Dice"])
    written = json.loads((pred / "s.json").read_text())
    assert written["mean_per_class"]["spleen"]["Dice"] is None
    assert "| spleen | n/a | n/a | n/a |" in format_table(serial)


def test_nnunet_style_arguments_evaluate_the_same(folders, tmp_path):
    """nnUNetv2_evaluate_folder's form: REF PRED -djfile dataset.json -pfile plans.json -o OUT."""
    _, ref, pred = folders
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (tmp_path / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO",
                                                     "label_manager": "LabelManager", "configurations": {}}))
    assert main([str(ref), str(pred), "-djfile", str(tmp_path / "dataset.json"), "-pfile",
                 str(tmp_path / "plans.json"), "-o", str(tmp_path / "nnunet.json")]) == 0
    assert main(["-ref", str(ref), "-pred", str(pred), "-d", "218", "-o", str(tmp_path / "samunet.json")]) == 0
    nnunet_style, samunet_style = (json.loads((tmp_path / n).read_text()) for n in ("nnunet.json", "samunet.json"))
    assert nnunet_style["per_case"] == samunet_style["per_case"]


def test_chill_evaluates_only_predicted_cases_and_says_which_were_left_out(folders, capsys):
    _, ref, pred = folders
    (pred / "case_0001.nii.gz").unlink()
    assert main([str(ref), str(pred), "-d", "218", "--chill"]) == 0
    summary = json.loads((pred / "summary_samunet.json").read_text())
    assert set(summary["per_case"]) == {"case_0000"} and summary["references_without_prediction"] == ["case_0001"]
    assert summary["reference_dir"] == str(ref)
    assert "1 reference(s) without a prediction were left out: case_0001" in capsys.readouterr().out


def test_plans_with_regions_are_refused_with_the_reason(folders, tmp_path, capsys):
    _, ref, pred = folders
    regions = dict(DATASET_JSON, labels={"background": 0, "organ": [1, 2], "kidney": 2}, regions_class_order=[1, 2])
    (tmp_path / "dataset.json").write_text(json.dumps(regions))
    (tmp_path / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO",
                                                     "label_manager": "LabelManager", "configurations": {}}))
    assert main([str(ref), str(pred), "-djfile", str(tmp_path / "dataset.json"), "-pfile",
                 str(tmp_path / "plans.json")]) == 2
    message = capsys.readouterr().err
    assert "regions" in message and "nnUNetv2_evaluate_folder" in message and message.count("\n") == 1
