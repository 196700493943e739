"""samunet_predict writes each case atomically as soon as it is done, resumes with --continue_prediction,
splits the cases with -num_parts/-part_id (nnU-Net's rule), runs -npp/-nps workers and shows progress
inside each case; the slice-stack predictor goes through the same path.

The model is a freshly initialised tiny network (vit_test, 64 px) saved as a samunet checkpoint in a
model folder made from the trainer harness's synthetic plans: prediction does not need trained weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.predict import build_predictor, main as predict_main, predict_folder
from samunet.inference import predict_cases
from trainer_harness import (DATASET_NAME, PREDICTION_CASES as CASES, PREDICTION_CASE_SHAPE as SHAPE, make_model_folder,
                             nnunet_environment, write_prediction_images)

def _predictor(progress: bool = False, trainer: str = "SAMedTrainer"):
    return build_predictor(DATASET_NAME, "2d", trainer, [0], device="cpu", use_mirroring=False, progress=progress)


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failed_run_leaves_only_complete_cases_and_continue_predicts_the_rest(model, monkeypatch):
    real_export = predict_cases.export_prediction_from_logits
    exported = []

    def export_that_dies_on_the_second_case(logits, properties, cm, pm, dataset_json, output, *args):
        exported.append(Path(output).name)
        if len(exported) == 2:
            Path(output + dataset_json["file_ending"]).write_bytes(b"half a NIfTI")  # a partial write, then death
            raise RuntimeError("export died")
        return real_export(logits, properties, cm, pm, dataset_json, output, *args)

    monkeypatch.setattr(predict_cases, "export_prediction_from_logits", export_that_dies_on_the_second_case)
    predictor = _predictor()
    with pytest.raises(RuntimeError, match="export died"):
        predict_folder(predictor, model["images"], model["out"])
    # exactly the first case, complete and readable, plus the model files; no temporary file or folder
    assert _outputs(model["out"]) == ["case_0000.nii.gz", "dataset.json", "plans.json"]
    first = model["out"] / "case_0000.nii.gz"
    assert sitk.ReadImage(str(first)).GetSize() == SHAPE[::-1]
    written_at = first.stat().st_mtime_ns

    exported.clear()
    monkeypatch.setattr(predict_cases, "export_prediction_from_logits",
                        lambda *args: exported.append(Path(args[5]).name) or real_export(*args))
    written = predict_folder(predictor, model["images"], model["out"], continue_prediction=True)
    assert exported == CASES[1:] and [p.name for p in written] == [f"{c}.nii.gz" for c in CASES[1:]]
    assert _outputs(model["out"]) == [f"{c}.nii.gz" for c in CASES] + ["dataset.json", "plans.json"]
    assert first.stat().st_mtime_ns == written_at
    # without --continue_prediction every case is predicted again
    exported.clear()
    predict_folder(predictor, model["images"], model["out"])
    assert exported == CASES


def test_continue_with_probabilities_redoes_cases_whose_npz_is_missing(model):
    predictor = _predictor()
    predict_folder(predictor, model["images"], model["out"], save_probabilities=True)
    (model["out"] / "case_0002.npz").unlink()
    written = predict_folder(predictor, model["images"], model["out"], save_probabilities=True,
                             continue_prediction=True)
    assert [p.name for p in written] == ["case_0002.nii.gz"] and (model["out"] / "case_0002.npz").is_file()


def test_parts_split_the_cases_like_nnunet_and_together_cover_all(model):
    for part in (1, 0):
        assert predict_main(["-i", str(model["images"]), "-o", str(model["out"]), "-d", DATASET_NAME,
                             "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0",
                             "-num_parts", "2", f"-part_id={part}", "--disable_progress_bar"]) == 0
        if part == 1:  # cases[1::2]
            assert _outputs(model["out"]) == ["case_0001.nii.gz", "case_0003.nii.gz", "dataset.json", "plans.json"]
    assert _outputs(model["out"]) == [f"{c}.nii.gz" for c in CASES] + ["dataset.json", "plans.json"]


def test_a_part_id_outside_the_parts_is_a_one_line_error(model, capsys):
    assert predict_main(["-i", str(model["images"]), "-o", str(model["out"]), "-d", DATASET_NAME,
                         "-num_parts", "2", "-part_id", "2"]) == 2
    assert "-part_id must be in 0..1" in capsys.readouterr().err and not model["out"].exists()


def test_worker_processes_give_the_same_predictions_as_in_process(model, monkeypatch):
    """-npp: nnunetv2's preprocessing iterator with that many workers; -nps: a pool of that many export
    workers; the outputs are those of the in-process run."""
    import multiprocessing

    import nnunetv2.inference.data_iterators as data_iterators
    started = {}
    iterator = data_iterators.preprocessing_iterator_fromfiles
    spawn = multiprocessing.get_context("spawn")

    class SpawnContext:  # the spawn context, counting the pools it starts
        def __getattr__(self, name):
            return getattr(spawn, name)

        def Pool(self, processes):
            started["export workers"] = processes
            return spawn.Pool(processes)

    def preprocessing_workers(*args):
        started["preprocessing workers"] = args[6]
        return iterator(*args)

    monkeypatch.setattr(data_iterators, "preprocessing_iterator_fromfiles", preprocessing_workers)
    monkeypatch.setattr(predict_cases.multiprocessing, "get_context", lambda method: SpawnContext())
    predictor = _predictor()
    predict_folder(predictor, model["images"], model["out"] / "here")
    assert started == {}
    predict_folder(predictor, model["images"], model["out"] / "workers", num_processes_preprocessing=2,
                   num_processes_export=1)
    assert started == {"preprocessing workers": 2, "export workers": 1}
    for case in CASES:
        here, there = (sitk.GetArrayFromImage(sitk.ReadImage(str(model["out"] / sub / f"{case}.nii.gz")))
                       for sub in ("here", "workers"))
        assert np.array_equal(here, there)
    assert _outputs(model["out"] / "workers") == _outputs(model["out"] / "here")


def test_progress_bars_over_cases_and_inside_each_case(model, capsys):
    predict_folder(_predictor(progress=True), model["images"], model["out"] / "a")
    err = capsys.readouterr().err
    assert "cases: 100%" in err and "4/4" in err  # over the cases
    assert err.count("3/3 [") >= 4  # nnunetv2's sliding-window bar: 3 windows (slices) per case
    predict_folder(_predictor(progress=False), model["images"], model["out"] / "b", progress=False)
    assert capsys.readouterr().err == ""


def test_the_slice_stack_predictor_goes_through_the_same_path(tmp_path):
    from samunet.inference.slice_stack_predictor import SliceStackPredictor
    with nnunet_environment(tmp_path) as folders:
        folder = make_model_folder(folders["nnUNet_results"], "SelfPromptSAMTrainer", depth=3)
        images = write_prediction_images(tmp_path / "images")
        assert predict_main(["-i", str(images), "-o", str(tmp_path / "out"), "-m", str(folder), "-f", "0",
                             "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0", "--disable_progress_bar",
                             "-num_parts", "2", "-part_id", "0"]) == 0
        predictor = build_predictor(DATASET_NAME, "2d", "SelfPromptSAMTrainer", [0], device="cpu",
                                    use_mirroring=False)
    assert isinstance(predictor, SliceStackPredictor)
    assert _outputs(tmp_path / "out") == ["case_0000.nii.gz", "case_0002.nii.gz", "dataset.json", "plans.json"]
    assert sitk.ReadImage(str(tmp_path / "out" / "case_0002.nii.gz")).GetSize() == SHAPE[::-1]


def test_continue_redoes_cut_off_outputs_and_names_them(model, caplog):
    """--continue_prediction keeps a case only when its outputs are complete: a cut-off label map or .npz
    (a copy interrupted, a disk that filled up under another program) is predicted again, with a warning."""
    predictor = _predictor()
    predict_folder(predictor, model["images"], model["out"], save_probabilities=True)
    label, npz = model["out"] / "case_0001.nii.gz", model["out"] / "case_0003.npz"
    label.write_bytes(label.read_bytes()[:60])
    npz.write_bytes(npz.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="samunet.inference.predict_cases"):
        written = predict_folder(predictor, model["images"], model["out"], save_probabilities=True,
                                 continue_prediction=True)
    assert [p.name for p in written] == ["case_0001.nii.gz", "case_0003.nii.gz"]
    assert f"predicting case_0001 again: {label} is incomplete (EOFError" in caplog.text
    assert f"predicting case_0003 again: {npz} is incomplete (BadZipFile" in caplog.text
    assert sitk.ReadImage(str(label)).GetSize() == SHAPE[::-1] and np.load(npz)["probabilities"].ndim == 4


@pytest.mark.parametrize("change, differ", [("dataset", "another data set"), ("labels", "other labels"),
                                            ("plans", "other plans")])
def test_an_output_folder_of_another_model_is_refused_before_anything_is_written(model, capsys, change, differ):
    """OUT holding another model's plans.json/dataset.json (another data set, other labels, other plans) is
    refused in one line naming both models, and nothing in OUT is skipped, replaced or added."""
    import copy
    import json
    predictor = _predictor()
    plans, dataset = copy.deepcopy(predictor.plans_manager.plans), copy.deepcopy(predictor.dataset_json)
    if change == "dataset":
        plans["dataset_name"] = "Dataset902_Other"
    elif change == "labels":
        dataset["labels"] = {**dataset["labels"], "tumour": len(dataset["labels"])}
    else:
        plans["configurations"]["2d"]["patch_size"] = [32, 32]
    model["out"].mkdir()
    (model["out"] / "plans.json").write_text(json.dumps(plans))
    (model["out"] / "dataset.json").write_text(json.dumps(dataset))
    (model["out"] / "case_0000.nii.gz").write_bytes(b"their prediction")
    before = {p.name: p.read_bytes() for p in model["out"].iterdir()}
    assert predict_main(["-i", str(model["images"]), "-o", str(model["out"]), "-d", DATASET_NAME, "-f", "0",
                         "-device", "cpu", "--disable_tta", "--continue_prediction", "--disable_progress_bar"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {model['out']} holds the predictions of another model, ") and error.count("\n") == 1
    assert f": {differ}; predict into another folder (-o)" in error
    assert f"not of this one, {DATASET_NAME} (plans" in error
    assert (change != "dataset") or "model, Dataset902_Other (plans" in error
    assert {p.name: p.read_bytes() for p in model["out"].iterdir()} == before
