"""Bad inputs of the commands that turn predictions into outputs (postprocessing, submission export,
benchmark conversion, evaluation, cross-validation summary): each is one line naming the file, exit code 2,
nothing written."""
from __future__ import annotations

import json
import pickle

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 2, "file_ending": ".nii.gz"}
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "configurations": {}}


def _write(array, path, dtype=np.uint8, spacing=(1.5, 1.5, 5.0)):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_a_postprocessing_file_of_other_labels_is_refused(tmp_path, capsys):
    """A postprocessing.pkl acting on label 7 (another data set's) where dataset.json declares 0..3: refused
    naming the file and the labels, nothing written (it used to postprocess silently, exit 0)."""
    from nnunetv2.postprocessing.remove_connected_components import \
        remove_all_but_largest_component_from_segmentation as keep_largest

    from samunet.cli.postprocessing import main_apply
    predictions = tmp_path / "pred"
    predictions.mkdir()
    _write(np.ones((2, 8, 8)), predictions / "case_0.nii.gz")
    (predictions / "plans.json").write_text(json.dumps(PLANS))
    (predictions / "dataset.json").write_text(json.dumps(DATASET_JSON))
    pkl = tmp_path / "pp_label7.pkl"
    pkl.write_bytes(pickle.dumps(([keep_largest], [{"labels_or_regions": 7}])))
    assert main_apply(["-i", str(predictions), "-o", str(tmp_path / "pp"), "-pp_pkl_file", str(pkl)]) == 2
    message = capsys.readouterr().err
    assert f"{pkl} acts on labels_or_regions [7]" in message and "declares the foreground labels [1, 2, 3]" in message
    assert str(predictions / "dataset.json") in message and message.count("\n") == 1
    assert not (tmp_path / "pp").exists()
    pkl.write_bytes(pickle.dumps(([keep_largest], [{"labels_or_regions": [1, 3]}])))  # declared: accepted
    assert main_apply(["-i", str(predictions), "-o", str(tmp_path / "pp"), "-pp_pkl_file", str(pkl)]) == 0


def test_evaluate_djfile_without_labels_names_the_file(tmp_path, capsys):
    """-djfile plans.json (not a dataset.json): the message names the file given and says what it lacks."""
    from samunet.cli.evaluate import main
    for folder in ("ref", "pred"):
        (tmp_path / folder).mkdir()
        _write(np.ones((2, 8, 8)), tmp_path / folder / "case_0.nii.gz")
    (tmp_path / "plans.json").write_text(json.dumps(PLANS))
    assert main([str(tmp_path / "ref"), str(tmp_path / "pred"), "-djfile", str(tmp_path / "plans.json")]) == 2
    message = capsys.readouterr().err
    assert f"{tmp_path / 'plans.json'} lacks labels, file_ending" in message and message.count("\n") == 1
