"""Tests of samunet_evaluate and samunet.evaluation.evaluate_folder on tiny NIfTI and png folders: outputs,
nnU-Net-style arguments, the ignore label (issue 13 row 4), 2D png (row 7) and the metric conventions."""
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
    with pytest.raises(EvaluationError, match=r"not declare: .*case_0000.nii.gz has \[7\] \(declared: \[0, 1, 2\]\)"):
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


# ---------------------------------------------------------------- issue 13, row 4: nnU-Net's ignore label

IGNORE_DATASET_JSON = dict(DATASET_JSON, labels={"background": 0, "liver": 1, "kidney": 2, "ignore": 3})


def _with_ignore_region(array):
    """The label map with an unannotated stripe (x 14-15, touching the kidney) and a slab (y 0-1)."""
    array = array.copy()
    array[:, :, 14:] = 3
    array[:, :2, :] = 3
    return array


def _ignore_folders(tmp_path, predictions):
    ref, pred = tmp_path / "ref_ignore", tmp_path / "pred_ignore"
    ref.mkdir()
    pred.mkdir()
    for case, prediction in predictions.items():
        _write(_with_ignore_region(_label_map()), ref / f"{case}.nii.gz")
        _write(prediction, pred / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(IGNORE_DATASET_JSON))
    return ref, pred


def _differs_only_in_ignored_region():
    """The reference's classes outside the ignored region; inside it, the kidney and liver go on."""
    prediction = _label_map()
    prediction[2:4, 11:14, 14:16] = 2  # the kidney continues into the unannotated stripe
    prediction[1:5, 0:2, 3:9] = 1      # and the liver into the slab
    return prediction


def test_ignore_label_excludes_its_region_from_every_class_as_nnunet(tmp_path):
    ref, pred = _ignore_folders(tmp_path, {"case_0000": _differs_only_in_ignored_region()})
    assert main([str(ref), str(pred), "-djfile", str(tmp_path / "dataset.json"), "-o", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert set(summary["per_case"]["case_0000"]) == {"liver", "kidney"}  # 'ignore' is no class
    for name in ("liver", "kidney"):
        assert summary["per_case"]["case_0000"][name] == {"Dice": 1.0, "NSD": 1.0, "HD95": 0.0}
    assert summary["ignore_label"] == 3 and "ignore" in summary["metric_conventions"]["ignore_label"]


def test_ignore_label_dice_equals_nnunetv2_compute_metrics(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    wrong_outside = _differs_only_in_ignored_region()
    wrong_outside[1:5, 3:9, 8] = 0    # the liver loses a column outside the ignored region
    wrong_outside[4, 11:14, 11:16] = 2  # the kidney gains a row, partly in it
    predictions = {"case_0000": _differs_only_in_ignored_region(), "case_0001": wrong_outside}
    ref, pred = _ignore_folders(tmp_path, predictions)
    summary = evaluate_folders(ref, pred, IGNORE_DATASET_JSON)
    for case in predictions:
        nnunet = compute_metrics(str(ref / f"{case}.nii.gz"), str(pred / f"{case}.nii.gz"), SimpleITKIO(), [1, 2],
                                 ignore_label=3)["metrics"]
        assert summary["per_case"][case]["liver"]["Dice"] == pytest.approx(nnunet[1]["Dice"], abs=1e-12)
        assert summary["per_case"][case]["kidney"]["Dice"] == pytest.approx(nnunet[2]["Dice"], abs=1e-12)
    assert summary["per_case"]["case_0001"]["liver"]["Dice"] < 1.0


def test_plans_with_an_ignore_label_are_accepted(tmp_path):
    ref, pred = _ignore_folders(tmp_path, {"case_0000": _differs_only_in_ignored_region()})
    (tmp_path / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO",
                                                     "label_manager": "LabelManager", "configurations": {}}))
    assert main([str(ref), str(pred), "-djfile", str(tmp_path / "dataset.json"), "-pfile",
                 str(tmp_path / "plans.json")]) == 0


# ---------------------------------------------------------------- issue 13, row 7: 2D png label maps

def test_png_references_and_predictions_are_scored_in_2d(tmp_path, capsys):
    from skimage import io
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    reference = np.zeros((10, 12), dtype=np.uint8)
    reference[2:6, 2:6] = 1
    reference[7:9, 8:11] = 2
    prediction = np.roll(reference, 1, axis=1)  # everything one pixel to the right
    io.imsave(ref / "img_1.png", reference, check_contrast=False)
    io.imsave(pred / "img_1.png", prediction, check_contrast=False)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "road": 1, "car": 2},
         "numTraining": 1, "file_ending": ".png"}))
    assert main([str(ref), str(pred), "-djfile", str(tmp_path / "dataset.json")]) == 0
    road = json.loads((pred / "summary_samunet.json").read_text())["per_case"]["img_1"]["road"]
    # 4x4 square moved by one 1-mm pixel: Dice 2*12/32, every contour element within 1 mm of the other
    assert road == pytest.approx({"Dice": 0.75, "NSD": 1.0, "HD95": 1.0})
    summary = json.loads((pred / "summary_samunet.json").read_text())
    car = summary["per_case"]["img_1"]["car"]
    assert car["Dice"] == pytest.approx(2 * 4 / 12) and car["HD95"] == pytest.approx(1.0)
    assert "single_slice" in summary["metric_conventions"]


# ---------------------------------------------------------------- deliverable 4: selectable conventions

@pytest.mark.parametrize("nsd,hd95", [("surface_area", "max_directed"), ("voxel", "pooled"),
                                      ("voxel", "max_directed"), ("surface_area", "pooled")])
def test_conventions_are_selectable_and_written_into_the_summary(folders, nsd, hd95):
    from samunet.evaluation.metrics import class_metrics
    _, ref, pred = folders
    _write(_label_map(shift=3), pred / "case_0001.nii.gz")
    assert main(["-ref", str(ref), "-pred", str(pred), "-d", "218", "--nsd", nsd, "--hd95", hd95]) == 0
    summary = json.loads((pred / "summary_samunet.json").read_text())
    assert summary["metric_conventions"]["nsd"] == nsd and summary["metric_conventions"]["hd95"] == hd95
    expected = class_metrics(_label_map() == 1, _label_map(shift=3) == 1, SPACING_XYZ[::-1], 2.0, nsd=nsd, hd95=hd95)
    assert summary["per_case"]["case_0001"]["liver"] == pytest.approx(expected)
    assert f"NSD: {nsd}" in (pred / "summary_samunet.md").read_text()


def test_default_conventions_are_nikolov_nsd_and_max_directed_hd95(folders):
    _, ref, pred = folders
    assert main(["-ref", str(ref), "-pred", str(pred), "-d", "218"]) == 0
    conventions = json.loads((pred / "summary_samunet.json").read_text())["metric_conventions"]
    assert (conventions["nsd"], conventions["hd95"]) == ("surface_area", "max_directed")
    assert "Nikolov" in conventions["nsd_definition"]
