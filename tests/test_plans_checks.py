"""Bad input met by planning and training before anything is written (issue 13, deliverable 2): dataset.json
fields of the wrong type or form, one dataset ID naming two folders, plans edited by hand, a configuration
samunet never plans, another fold trained after re-planning, unreadable -pretrained_weights (and --c after
them), a truncated checkpoint_best.pth for --val_best, a disk that fills up during preprocessing."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from samunet.cli.train import main as train_main
from samunet.errors import ConfigurationError, DatasetError, UnknownNameError
from samunet.trainers.base import SAMTrainerBase
from samunet.trainers.samed import SAMedTrainer

DATASET = "Dataset991_PhantomTiny"
MODEL = "SAMedTrainer__samunetPlans__2d"
TINY = ["-device", "cpu", "--iters-per-epoch", "1", "--val-iters", "1", "--batch-size", "2", "--weights", "none"]


@pytest.fixture
def tiny(tiny_dataset_root, tmp_path, monkeypatch) -> dict[str, Path]:
    """A private copy of the tiny planned phantom (its plans may be edited) with an empty nnUNet_results (the
    shared one holds what other tests trained), the variables pointing at it."""
    folders = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folders[name] = tmp_path / name
        if name == "nnUNet_results":
            folders[name].mkdir()
        else:
            shutil.copytree(tiny_dataset_root / name, folders[name])
        monkeypatch.setenv(name, str(folders[name]))
    return folders


def one_line_error(capsys) -> str:
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1, message
    return message


def edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


# --- dataset.json fields: rows 9, 10, 30 of the breaker report ---

@pytest.mark.parametrize("field, value, expected", [
    ("numTraining", "5", "numTraining is '5' (str); it must be the number of training cases as a JSON integer"),
    ("file_ending", "nii.gz", "file_ending is 'nii.gz' without its leading dot; write \".nii.gz\""),
    ("channel_names", {}, "channel_names is {}; it must name every image channel by its number"),
    ("channel_names", {"1": "CT"}, "channel_names has the keys ['1']; they must be the channel numbers ['0']"),
])
def test_dataset_json_fields_of_the_wrong_type_or_form_are_named_before_the_files_are_listed(
        tiny, field, value, expected):
    from samunet.preprocessing.dataset_checks import validate_raw_dataset
    raw = tiny["nnUNet_raw"] / DATASET
    edit_json(raw / "dataset.json", lambda content: content.__setitem__(field, value))
    with pytest.raises(DatasetError) as caught:
        validate_raw_dataset(raw, num_processes=0)
    assert str(caught.value).startswith(f"{raw / 'dataset.json'}: {expected}")


def test_the_shared_dataset_json_check_skips_num_training_for_a_model(tmp_path):
    from samunet.preprocessing.dataset_checks import check_dataset_json_fields
    model_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
    check_dataset_json_fields(model_json, tmp_path / "dataset.json", training=False)
    with pytest.raises(DatasetError, match="file_ending is 'png' without its leading dot"):
        check_dataset_json_fields({**model_json, "file_ending": "png"}, tmp_path / "dataset.json", training=False)


# --- row 18: two folders with one ID ---

def test_an_id_naming_two_folders_lists_them_and_a_missing_id_says_none(nnunet_folders):
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    (nnunet_folders["nnUNet_raw"] / "Dataset900_Base").mkdir()
    (nnunet_folders["nnUNet_results"] / "Dataset900_Base").mkdir()
    (nnunet_folders["nnUNet_raw"] / "Dataset900_Dup").mkdir()
    with pytest.raises(UnknownNameError) as caught:
        resolve_dataset_name("900")
    assert ("dataset ID 900 names 2 folders: Dataset900_Base (in nnUNet_raw, nnUNet_results); Dataset900_Dup (in "
            "nnUNet_raw)") in str(caught.value)
    with pytest.raises(UnknownNameError, match="no dataset 901 found"):
        resolve_dataset_name("901")


# --- rows 11, 12, 25: plans edited by hand, a configuration samunet never plans ---

@pytest.mark.parametrize("patch_size, expected", [
    ([50, 50], "has patch_size [50, 50], but its network (backbone vit_test, img_size 64) takes 64 x 64 slices"),
    ([4, 64, 64], "has patch_size [4, 64, 64], but its network (backbone vit_test, img_size 64) takes 64 x 64 "
                  "slices (slice stacks take their depth from arch_kwargs.depth"),
])
def test_a_hand_edited_patch_size_is_refused_before_the_fold_folder_is_touched(tiny, capsys, patch_size, expected):
    plans = tiny["nnUNet_preprocessed"] / DATASET / "samunetPlans.json"
    edit_json(plans, lambda content: content["configurations"]["2d"].__setitem__("patch_size", patch_size))
    assert train_main(["991", "2d", "all", *TINY]) == 2
    message = one_line_error(capsys)
    assert message.startswith(f"error: {plans}: configuration '2d' {expected}")
    assert "set patch_size to [64, 64]" in message
    assert not (tiny["nnUNet_results"] / DATASET).exists()


@pytest.mark.parametrize("key, value, expected", [
    ("depth", 0, "has arch_kwargs.depth 0; SelfPromptSAMTrainer needs a positive number of slices per stack"),
    ("slice_stack_batch_size", 0, "has slice_stack_batch_size 0; SelfPromptSAMTrainer needs a positive number of "
                                  "stacks per batch (set it, or give --batch-size N)"),
    ("slice_stack_batch_size", "2", "has slice_stack_batch_size '2'"),
])
def test_a_hand_edited_stack_depth_or_stacks_per_batch_is_refused_in_one_line(key, value, expected):
    from samunet.trainers.plans_checks import check_plans_configuration
    from samunet.trainers.self_prompt_sam import SelfPromptSAMTrainer
    configuration = {"patch_size": [64, 64], "batch_size": 4, "slice_stack_batch_size": 1,
                     "architecture": {"network_class_name": "x", "_kw_requires_import": [],
                                      "arch_kwargs": {"backbone": "vit_test", "img_size": 64, "depth": 3}}}
    plans = {"configurations": {"2d": configuration}}
    check_plans_configuration(plans, "2d", SelfPromptSAMTrainer, "plans.json")
    (configuration["architecture"]["arch_kwargs"] if key == "depth" else configuration)[key] = value
    with pytest.raises(ConfigurationError) as caught:
        check_plans_configuration(plans, "2d", SelfPromptSAMTrainer, "plans.json")
    assert str(caught.value).startswith(f"plans.json: configuration '2d' {expected}")
    check_plans_configuration(plans, "2d", SAMedTrainer, "plans.json")  # only slice-stack trainers use them


def test_3d_fullres_is_refused_saying_samunet_plans_only_2d(planned_tiny_dataset, capsys):
    assert train_main(["991", "3d_fullres", "all", *TINY]) == 2
    message = one_line_error(capsys)
    assert "samunet plans only '2d'" in message and "planning again never adds '3d_fullres'" in message
    assert "samunet_train DATASET 2d FOLD" in message


# --- row 21: another fold trained after re-planning ---

def test_training_another_fold_after_replanning_is_refused_while_other_folds_hold_checkpoints(tiny, capsys):
    from samunet.trainers.plans_checks import check_model_folder_plans
    plans_file = tiny["nnUNet_preprocessed"] / DATASET / "samunetPlans.json"
    model = tiny["nnUNet_results"] / DATASET / MODEL
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"trained")
    replanned = json.loads(plans_file.read_text())
    replanned["configurations"]["2d"]["spacing"] = [9.0, 9.0]
    (model / "plans.json").write_text(json.dumps(replanned))
    with mock.patch.object(SAMTrainerBase, "run_training", lambda self: None), \
            mock.patch.object(SAMTrainerBase, "perform_actual_validation", lambda self, *args: None):
        assert train_main(["991", "2d", "1", *TINY]) == 2
    message = one_line_error(capsys)
    assert f"error: {model / 'plans.json'} holds other samunetPlans plans than this training would use" in message
    assert "fold_0 hold(s) checkpoints" in message and "-overwrite_plans_name NAME" in message
    assert not (model / "fold_1").exists()
    same = json.loads(plans_file.read_text())
    (model / "plans.json").write_text(json.dumps(same))
    check_model_folder_plans(model / "fold_1", same, "2d", "samunetPlans")  # the same plans: accepted


# --- rows 28, 29: -pretrained_weights unreadable, recorded for --c; truncated checkpoint_best for --val_best ---

def test_unreadable_pretrained_weights_are_refused_before_the_fold_folder_is_written(tiny, tmp_path, capsys):
    truncated = tmp_path / "cut.pth"
    torch.save({"network_weights": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for weights in (truncated, tmp_path / "missing.pth"):
        assert train_main(["991", "2d", "all", *TINY, "-pretrained_weights", str(weights)]) == 2
        assert f"-pretrained_weights {weights}" in one_line_error(capsys)
    assert not (tiny["nnUNet_results"] / DATASET).exists()


def test_continue_without_a_checkpoint_starts_again_from_the_recorded_pretrained_weights(tiny, tmp_path, capsys):
    from samunet.cli.train import _set_up_trainer, load_plans
    from samunet.registry import TRAINERS
    from samunet.trainers.finetune import read_pretrained_weights
    from samunet.trainers.run_settings import read_run_settings
    fold = tiny["nnUNet_results"] / DATASET / MODEL / "fold_all"
    trainer_class = TRAINERS.get("SAMedTrainer")

    def set_up(**options):
        plans, dataset_json = load_plans(DATASET, "samunetPlans")
        return _set_up_trainer(trainer_class, plans, dataset_json, "2d", "all", fold, only_validate=False,
                               device="cpu", hyperparameters={"weights": "none"}, backbone=None, depth=None,
                               **options)

    donor = set_up(continue_training=False)
    donor.initialize()
    weights = {key: torch.full_like(value, 0.25) for key, value in donor.network.state_dict().items()}
    pretrained = tmp_path / "pretrained.pth"
    torch.save({"network_weights": weights}, pretrained)
    shutil.rmtree(fold)
    set_up(continue_training=False, pretrained=read_pretrained_weights(pretrained))
    assert read_run_settings(fold).pretrained_weights == str(pretrained)
    resumed = set_up(continue_training=True)  # killed before its first checkpoint: none in the fold folder
    some_key = next(key for key, value in weights.items() if value.is_floating_point())
    assert torch.equal(resumed.network.state_dict()[some_key].cpu(), weights[some_key])

    resumed.save_checkpoint(str(fold / "checkpoint_final.pth"))
    best = fold / "checkpoint_best.pth"
    best.write_bytes((fold / "checkpoint_final.pth").read_bytes()[:500])
    assert train_main(["991", "2d", "all", *TINY, "--val", "--val_best"]) == 2
    message = one_line_error(capsys)
    assert message.startswith(f"error: --val_best: {best} cannot be read (")
    assert "restore it from a copy" in message and message.rstrip().endswith("--val without --val_best")


def test_a_long_torch_error_is_not_cut_mid_sentence(tmp_path):
    from samunet.trainers.checkpoints import CheckpointUnreadableError, read_checkpoint
    path = tmp_path / "checkpoint_best.pth"
    path.write_bytes(b"x" * 100)
    sentence = "First sentence of a long loader message" + " that goes on" * 12 + "."
    with mock.patch("torch.load", side_effect=RuntimeError(f"{sentence} Second sentence, also long" + " x" * 80)):
        with pytest.raises(CheckpointUnreadableError) as caught:
            read_checkpoint(path)
    assert f"(RuntimeError: {sentence}); it is truncated" in str(caught.value)


# --- row 24: a disk that fills up during preprocessing ---

def test_a_full_disk_during_preprocessing_is_one_line_naming_the_folder_and_training_refuses_the_half_data(
        tiny, capsys):
    from samunet.cli.plan_and_preprocess import main as plan_main
    full = shutil._ntuple_diskusage(total=150_000, used=149_000, free=1_000)
    blosc2_failure = RuntimeError("Error while creating the NDArray")
    with mock.patch("nnunetv2.experiment_planning.plan_and_preprocess_api.preprocess_dataset",
                    side_effect=blosc2_failure), \
            mock.patch("samunet.cli.plan_and_preprocess.shutil.disk_usage", return_value=full):
        assert plan_main(["-d", "991", "--backbone", "vit_test", "--image-size", "64", "-np", "1"]) == 2
    message = one_line_error(capsys)
    assert f"no space left on the device holding {tiny['nnUNet_preprocessed'] / DATASET}" in message
    assert train_main(["991", "2d", "all", *TINY]) == 2
    assert "run samunet_plan_and_preprocess -d 991" in one_line_error(capsys)


def test_a_preprocessing_failure_with_space_left_passes_unchanged(tmp_path):
    from samunet.cli.plan_and_preprocess import reporting_full_disk
    roomy = shutil._ntuple_diskusage(total=10 ** 12, used=0, free=10 ** 12)
    with mock.patch("samunet.cli.plan_and_preprocess.shutil.disk_usage", return_value=roomy), \
            pytest.raises(RuntimeError, match="NDArray"), reporting_full_disk(tmp_path):
        raise RuntimeError("Error while creating the NDArray")
    with mock.patch("samunet.cli.plan_and_preprocess.shutil.disk_usage",
                    return_value=roomy._replace(free=10)), pytest.raises(OSError) as caught, \
            reporting_full_disk(tmp_path):
        raise RuntimeError("Error while creating the NDArray")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path)
