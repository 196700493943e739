"""Few labels (``--labelled-fraction``): the seeded draw of a fold's training slices or cases, its file next to
``splits_final.json``, nnU-Net's 2d data loader seeing labelled slices only, and the command line."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from samunet.errors import ConfigurationError
from samunet.trainers import labelled_subset
from samunet.trainers.labelled_subset import draw_cases, draw_slices, number_to_label

TINY_DATASET = "Dataset991_PhantomTiny"
NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@pytest.fixture
def tiny_copy(tiny_dataset_root, tmp_path, monkeypatch) -> dict[str, Path]:
    """The tiny planned phantom (5 cases of 8 slices) copied for one test, with the nnU-Net variables on it: the
    subset files this test writes next to its splits stay its own."""
    folders = {}
    for name in NNUNET_VARIABLES:
        folders[name] = tmp_path / name
        shutil.copytree(tiny_dataset_root / name, folders[name])
        monkeypatch.setenv(name, str(folders[name]))
    return folders


def make_trainer(hyperparameters: dict, trainer_name: str = "SAMedTrainer"):
    """A trainer of the tiny phantom's fold 0 (constructed, not initialised) with ``hyperparameters``."""
    from samunet.cli.train import load_plans
    from samunet.registry import TRAINERS
    plans, dataset_json = load_plans(TINY_DATASET, "samunetPlans")
    plans["continue_training"] = False  # nnUNetTrainer.__init__ pops it
    trainer = TRAINERS.get(trainer_name)(plans, "2d", 0, dataset_json, torch.device("cpu"))
    trainer.set_hyperparameters(hyperparameters)
    return trainer


def subset_files(folders) -> list[Path]:
    return sorted((folders["nnUNet_preprocessed"] / TINY_DATASET).glob("labelled_subset_*.json"))


# ---- the draw ----------------------------------------------------------------------------------------------

def test_rounding_is_floor_of_the_product_and_never_none():
    assert number_to_label(0.1, 2212) == 221  # H-SAM's Synapse setting: 221 of 2212 slices
    assert number_to_label(0.7, 10) == 7  # 0.7 * 10 = 6.999... in floating point
    assert number_to_label(0.3, 18) == 5
    assert number_to_label(0.01, 5) == 1  # at least one
    assert number_to_label(1.0, 7) == 7
    slices = draw_slices({"a": 30, "b": 40, "c": 30}, 0.25, seed=0)
    assert sum(len(v) for v in slices.values()) == 25
    assert len(draw_cases([f"case{i}" for i in range(18)], 0.3, seed=0)) == 5
    assert len(draw_cases(["only"], 0.1, seed=0)) == 1


def test_same_seed_same_subset_other_seed_another():
    counts = {f"case{i}": 20 + i for i in range(6)}
    first = draw_slices(counts, 0.1, seed=0)
    assert draw_slices(dict(reversed(list(counts.items()))), 0.1, seed=0) == first  # order of the cases: no matter
    assert draw_slices(counts, 0.1, seed=1) != first
    cases = [f"case{i}" for i in range(20)]
    assert draw_cases(cases[::-1], 0.2, seed=5) == draw_cases(cases, 0.2, seed=5)
    assert draw_cases(cases, 0.2, seed=6) != draw_cases(cases, 0.2, seed=5)


# ---- the trainer's datasets ----------------------------------------------------------------------------------

def mark_slices(dataset, identifiers) -> dict[float, tuple[str, int]]:
    """Rewrite the preprocessed images of ``identifiers`` so that every slice holds one value of its own (labels
    and foreground locations stay); returns value -> (case, slice)."""
    marks = {}
    for number, case in enumerate(identifiers):
        data, seg, _, properties = dataset.load_case(case)
        data, seg = np.array(data[:]), np.array(seg[:])
        for z in range(data.shape[1]):
            marks[float(100 * (number + 1) + z)] = (case, z)
            data[:, z] = 100 * (number + 1) + z
        for written in Path(dataset.source_folder).glob(f"{case}*.b2nd"):
            written.unlink()  # blosc2 writes no file over an existing one
        with warnings.catch_warnings():  # nnU-Net warns that no chunk shape is given; its default is fine here
            warnings.simplefilter("ignore", UserWarning)
            dataset.save_case(data, seg, properties, str(Path(dataset.source_folder) / case))
    return marks


def test_training_batches_hold_labelled_slices_only(tiny_copy):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    trainer = make_trainer({"labelled_fraction": 0.25})
    splits_file = tiny_copy["nnUNet_preprocessed"] / TINY_DATASET / "splits_final.json"
    trainer.do_split()  # writes nnU-Net's splits
    splits = json.loads(splits_file.read_text())
    marks = mark_slices(trainer.dataset_class(trainer.preprocessed_dataset_folder, splits[0]["train"]),
                        splits[0]["train"])
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    assert sorted(dataset_val.identifiers) == sorted(splits[0]["val"])  # validation: the full fold
    labelled = {(case, z) for case, slices in dataset_tr.labelled.items() for z in slices}
    assert len(labelled) == len(marks) // 4  # 8 of the 32 training slices
    patch = trainer.configuration_manager.patch_size
    np.random.seed(0)
    loader = nnUNetDataLoader(dataset_tr, 4, patch, patch, trainer.label_manager, oversample_foreground_percent=0.5)
    seen = set()
    for _ in range(12):
        for data in next(loader)["data"]:
            found = marks[float(data.max())]  # the slice's own value; the rest of the patch is zero padding
            assert found in labelled, f"an unlabelled slice {found} reached a training batch"
            seen.add(found)
    assert len(seen) > 1


def test_cases_unit_keeps_whole_cases(tiny_copy):
    trainer = make_trainer({"labelled_fraction": 0.5, "labelled_unit": "cases", "labelled_seed": 2})
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    splits = json.loads((tiny_copy["nnUNet_preprocessed"] / TINY_DATASET / "splits_final.json").read_text())
    assert len(dataset_tr.identifiers) == 2 and set(dataset_tr.identifiers) <= set(splits[0]["train"])
    assert sorted(dataset_val.identifiers) == sorted(splits[0]["val"])
    [written] = subset_files(tiny_copy)
    assert written.name == "labelled_subset_fold0_cases_0.5_seed2.json"
    assert json.loads(written.read_text())["labelled_cases"] == sorted(dataset_tr.identifiers)


def test_full_fraction_is_nnunets_behaviour(tiny_copy):
    trainer = make_trainer({"labelled_fraction": 1.0})
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    assert isinstance(dataset_tr, trainer.dataset_class) and len(dataset_tr.identifiers) == 4
    assert subset_files(tiny_copy) == []


def test_subset_file_is_written_atomically_and_reused_by_continue(tiny_copy):
    from samunet.cli.train import _set_up_trainer, load_plans
    from samunet.registry import TRAINERS
    settings = {"labelled_fraction": 0.25, "labelled_seed": 3}
    with mock.patch.object(labelled_subset, "write_json_atomically",
                           wraps=labelled_subset.write_json_atomically) as writes:
        first, _ = make_trainer(settings).get_tr_and_val_datasets()
    [written] = subset_files(tiny_copy)
    assert writes.call_count == 1 and Path(writes.call_args.args[0]) == written
    assert written.name == "labelled_subset_samunetPlans_2d_fold0_slices_0.25_seed3.json"
    content = json.loads(written.read_text())
    assert content["labelled_slices"] == first.labelled and content["rounding"]
    # a hand-edited subset (one slice) is what the next run trains on; --c restores the fraction and seed
    case = sorted(first.labelled)[0]
    content["labelled_slices"] = {case: [5]}
    written.write_text(json.dumps(content))
    plans, dataset_json = load_plans(TINY_DATASET, "samunetPlans")
    fold_folder = tiny_copy["nnUNet_results"] / "fold_settings"
    _set_up_trainer(TRAINERS.get("SAMedTrainer"), plans, dataset_json, "2d", 0, fold_folder, continue_training=False,
                    only_validate=False, device="cpu", hyperparameters=dict(settings), backbone=None, depth=None)
    plans, dataset_json = load_plans(TINY_DATASET, "samunetPlans")
    with mock.patch.object(labelled_subset, "write_json_atomically") as writes:
        resumed = _set_up_trainer(TRAINERS.get("SAMedTrainer"), plans, dataset_json, "2d", 0, fold_folder,
                                  continue_training=True, only_validate=False, device="cpu", hyperparameters={},
                                  backbone=None, depth=None)
        again, _ = resumed.get_tr_and_val_datasets()
    assert writes.call_count == 0
    assert resumed.hyperparameters["labelled_fraction"] == 0.25 and resumed.hyperparameters["labelled_seed"] == 3
    assert again.labelled == {case: [5]} and again.identifiers == [case]


def test_subset_file_of_other_training_cases_is_refused(tiny_copy):
    make_trainer({"labelled_fraction": 0.5}).get_tr_and_val_datasets()
    [written] = subset_files(tiny_copy)
    content = json.loads(written.read_text())
    content["training_cases"] = content["training_cases"][1:]
    written.write_text(json.dumps(content))
    with pytest.raises(ConfigurationError, match="other training cases.*delete it"):
        make_trainer({"labelled_fraction": 0.5}).get_tr_and_val_datasets()


# ---- options and the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan"])
@pytest.mark.parametrize("command", ["train", "train_cv"])
def test_bad_fraction_is_one_line_exit_2(command, value, nnunet_folders, capsys):
    from samunet.cli import train, train_cv
    main = train.main if command == "train" else train_cv.main
    arguments = ["991", "2d", *(["0"] if command == "train" else []), "--labelled-fraction", value]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --labelled-fraction must be a number in (0, 1]") and "\n" not in error
    assert not any(nnunet_folders["nnUNet_results"].iterdir())


def test_slices_refused_for_slice_stack_trainers(tiny_copy):
    from samunet.cli import train
    with mock.patch.object(train, "_set_up_trainer", side_effect=AssertionError("the fold folder was used")), \
            pytest.raises(ConfigurationError, match="slice-stack trainer.*--labelled-unit cases"):
        train.train(991, "2d", 0, "SelfPromptSAMTrainer", device="cpu", hyperparameters={"labelled_fraction": 0.1})
    assert not (tiny_copy["nnUNet_results"] / TINY_DATASET / "SelfPromptSAMTrainer__samunetPlans__2d").exists()
    with pytest.raises(ConfigurationError, match="slice-stack trainer"):  # the trainer refuses it too
        make_trainer({"labelled_fraction": 0.1}, "SelfPromptSAMTrainer")
    make_trainer({"labelled_fraction": 0.1, "labelled_unit": "cases"}, "SelfPromptSAMTrainer")
    with pytest.raises(ConfigurationError, match="--labelled-unit must be"):
        make_trainer({"labelled_fraction": 0.1, "labelled_unit": "volumes"})


def test_options_parse_on_train_and_train_cv():
    from samunet.cli import train, train_cv
    options = ["--labelled-fraction", "0.1", "--labelled-unit", "cases", "--labelled-seed", "7"]
    expected = {"labelled_fraction": 0.1, "labelled_unit": "cases", "labelled_seed": 7}
    args = train.build_parser().parse_args(["991", "2d", "0", *options])
    assert train.hyperparameters_from_args(args) == expected
    args = train_cv.build_parser().parse_args(["991", "2d", *options])
    assert train_cv.hyperparameters_from_args(args) == expected
    command = train_cv.fold_command(args, 1, "cpu")
    assert command[command.index("--labelled-fraction") + 1] == "0.1"
    assert command[command.index("--labelled-unit") + 1] == "cases"
    assert command[command.index("--labelled-seed") + 1] == "7"
    assert train.hyperparameters_from_args(train.build_parser().parse_args(["991", "2d", "0"])) == {}


def test_demo_takes_the_options_and_refuses_a_bad_fraction_before_writing(tmp_path, capsys):
    from samunet.cli import demo
    args = demo.build_parser().parse_args(["--labelled-fraction", "0.5", "--labelled-unit", "cases"])
    assert (args.labelled_fraction, args.labelled_unit, args.labelled_seed) == (0.5, "cases", None)
    with mock.patch.object(demo, "run_demo", side_effect=AssertionError("the demo started")):
        assert demo.main(["--output", str(tmp_path / "demo"), "-device", "cpu", "--labelled-fraction", "2"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --labelled-fraction must be a number in (0, 1]")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("command", ["train", "train_cv", "demo"])
@pytest.mark.parametrize("option", [["--labelled-unit", "cases"], ["--labelled_seed", "5"]])
def test_unit_or_seed_without_a_fraction_is_refused(command, option, nnunet_folders, tmp_path, capsys):
    """--labelled-unit / --labelled-seed alone would train on all the data: one line, exit 2, nothing written."""
    from samunet.cli import demo, train, train_cv
    main = {"train": train.main, "train_cv": train_cv.main, "demo": demo.main}[command]
    arguments = {"train": ["991", "2d", "0"], "train_cv": ["991", "2d"],
                 "demo": ["--output", str(tmp_path / "demo"), "-device", "cpu"]}[command]
    with mock.patch.object(demo, "run_demo", side_effect=AssertionError("the demo started")):
        assert main([*arguments, *option]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --labelled-") and "need(s) --labelled-fraction F" in error and "\n" not in error
    assert not any(nnunet_folders["nnUNet_results"].iterdir()) and not (tmp_path / "demo").exists()


def _set_up(continue_training: bool, hyperparameters: dict, fold_folder: Path, only_validate: bool = False):
    from samunet.cli.train import _set_up_trainer, load_plans
    from samunet.registry import TRAINERS
    plans, dataset_json = load_plans(TINY_DATASET, "samunetPlans")
    return _set_up_trainer(TRAINERS.get("SAMedTrainer"), plans, dataset_json, "2d", 0, fold_folder,
                           continue_training=continue_training, only_validate=only_validate, device="cpu",
                           hyperparameters=dict(hyperparameters), backbone=None, depth=None)


def test_continue_refuses_another_labelled_subset_or_lr_and_accepts_a_longer_training(tiny_copy):
    """--c with another --labelled-fraction/-unit/-seed (or --lr, --batch-size) than the run recorded is refused
    in one line naming the run's setting; the recorded values again, more epochs or a new budget are accepted."""
    fold_folder = tiny_copy["nnUNet_results"] / "fold_continue"
    _set_up(False, {"labelled_fraction": 0.25, "labelled_seed": 3}, fold_folder)
    for changed in ({"labelled_fraction": 0.5}, {"labelled_unit": "cases"}, {"labelled_seed": 4},
                    {"labelled_fraction": 1.0}):
        with pytest.raises(ConfigurationError) as refused:
            _set_up(True, changed, fold_folder)
        message = str(refused.value)
        assert "trained with --labelled-fraction 0.25 (slices, seed 3); --c continues with it: leave out" in message
        assert "\n" not in message
    for changed, recorded in (({"initial_lr": 0.5}, "--lr"), ({"batch_size": 7}, "--batch-size")):
        with pytest.raises(ConfigurationError, match=f"trained with {recorded} .*--c continues with it"):
            _set_up(True, changed, fold_folder)
    resumed = _set_up(True, {"labelled_fraction": 0.25, "labelled_seed": 3, "labelled_unit": "slices",
                             "num_epochs": 7, "max_minutes": 5.0}, fold_folder)
    assert resumed.hyperparameters["labelled_fraction"] == 0.25 and resumed.num_epochs == 7
    full = tiny_copy["nnUNet_results"] / "fold_full"
    _set_up(False, {}, full)
    with pytest.raises(ConfigurationError, match="trained with all of the fold's training data"):
        _set_up(True, {"labelled_fraction": 0.5}, full)


def test_val_ignores_training_only_options_and_says_so(tiny_copy, caplog):
    """--val --labelled-fraction 0.3 --max-minutes 7: the trained run's settings stay, a log line says so."""
    from samunet.trainers import checkpoints
    fold_folder = tiny_copy["nnUNet_results"] / "fold_val"
    _set_up(False, {"labelled_fraction": 0.5, "labelled_unit": "cases"}, fold_folder)
    with mock.patch.object(checkpoints, "checkpoint_to_validate", return_value=None), caplog.at_level("WARNING"):
        trainer = _set_up(False, {"labelled_fraction": 0.3, "max_minutes": 7.0, "precision": "fp32"}, fold_folder,
                          only_validate=True)
    assert trainer.hyperparameters["labelled_fraction"] == 0.5 and "max_minutes" not in trainer.hyperparameters
    assert trainer.hyperparameters["precision"] == "fp32"
    assert "--labelled-fraction, --max-minutes have no effect with --val" in caplog.text


@pytest.mark.parametrize("edit, expected", [
    (["case_9999"], "names 'case_9999', which is not a training case of fold 0; the training cases are"),
    ("VALIDATION", "which is not a training case of fold 0 (it is a validation case of the fold)"),
    ([], "must be a list of one or more of the fold's training cases"),
])
def test_an_edited_subset_file_names_the_wrong_entry(tiny_copy, edit, expected):
    """A hand-edited labelled_cases: the error names the entry, the fold's training cases and says to correct
    the entry (the file may be edited) or delete the file."""
    trainer = make_trainer({"labelled_fraction": 0.5, "labelled_unit": "cases"})
    _, validation = trainer.get_tr_and_val_datasets()
    [written] = subset_files(tiny_copy)
    content = json.loads(written.read_text())
    content["labelled_cases"] = [validation.identifiers[0]] if edit == "VALIDATION" else edit
    written.write_text(json.dumps(content))
    with pytest.raises(ConfigurationError) as refused:
        make_trainer({"labelled_fraction": 0.5, "labelled_unit": "cases"}).get_tr_and_val_datasets()
    message = str(refused.value)
    assert expected in message and "correct the entry (the file may be edited) or delete the file" in message
    assert "\n" not in message
    if edit == "VALIDATION":
        assert repr(str(validation.identifiers[0])) in message


def test_an_edited_slice_outside_its_case_is_named(tiny_copy):
    first, _ = make_trainer({"labelled_fraction": 0.25}).get_tr_and_val_datasets()
    [written] = subset_files(tiny_copy)
    content = json.loads(written.read_text())
    case = sorted(first.labelled)[0]
    content["labelled_slices"] = {case: [99]}
    written.write_text(json.dumps(content))
    with pytest.raises(ConfigurationError, match=f"labelled_slices of '{case}' holds 99, but {case} has slices 0 to 7"):
        make_trainer({"labelled_fraction": 0.25}).get_tr_and_val_datasets()
