"""Every nnunetv2 2.8.1 option of a command samunet mirrors is accepted with nnU-Net's spelling and
meaning (docs/nnunet_users.md has the table), samunet's own spellings stay aliases of the same
option, single-dash long options are never misread as a short option plus a value, and the options
samunet cannot honour are refused in one line with exit code 2."""
from __future__ import annotations

import argparse

import pytest

from samunet.cli import (ensemble, evaluate, find_best, plan_and_preprocess, postprocessing, predict, train,
                         train_cv)

PARSERS = {
    "samunet_train": (train.build_parser, ["218", "2d", "0"]),
    "samunet_train_cv": (train_cv.build_parser, ["218", "2d"]),
    "samunet_predict": (predict.build_parser, ["-i", "in", "-o", "out"]),
    "samunet_plan_and_preprocess": (plan_and_preprocess.build_parser, ["-d", "218"]),
    "samunet_ensemble": (ensemble.build_parser, ["-i", "a", "b", "-o", "out"]),
    "samunet_evaluate": (evaluate.build_parser, []),
    "samunet_find_best": (find_best.build_parser, []),
    "samunet_apply_postprocessing": (postprocessing.build_apply_parser, ["-i", "a", "-o", "b", "-pp_pkl_file", "p"]),
    "samunet_determine_postprocessing": (postprocessing.build_determine_parser, ["-i", "a", "-ref", "r"]),
}

# (samunet command, nnU-Net's arguments, {dest: value}); the nnunetv2 command is named in the id
NNUNET_SPELLINGS = [
    # nnUNetv2_train DATASET CONFIGURATION FOLD
    ("samunet_train", ["-tr", "HSAMTrainer"], {"trainer": "HSAMTrainer"}),
    ("samunet_train", ["-p", "myPlans"], {"plans": "myPlans"}),
    ("samunet_train", ["-pretrained_weights", "model.pth"], {"pretrained_weights": "model.pth"}),
    ("samunet_train", ["--npz"], {"npz": True}),
    ("samunet_train", ["--c"], {"continue_training": True}),
    ("samunet_train", ["--val"], {"only_validate": True}),
    ("samunet_train", ["--val_best"], {"val_best": True}),
    ("samunet_train", ["--disable_checkpointing"], {"disable_checkpointing": True}),
    ("samunet_train", ["-device", "cpu"], {"device": "cpu"}),
    ("samunet_train", ["-device", "mps"], {"device": "mps"}),
    ("samunet_train_cv", ["-pretrained_weights", "m.pth", "--val_best", "--disable_checkpointing", "--npz"],
     {"pretrained_weights": "m.pth", "val_best": True, "disable_checkpointing": True, "npz": True}),
    # nnUNetv2_predict / nnUNetv2_predict_from_modelfolder
    ("samunet_predict", ["-d", "218"], {"dataset": "218"}),
    ("samunet_predict", ["-p", "myPlans", "-tr", "HSAMTrainer", "-c", "2d"],
     {"plans": "myPlans", "trainer": "HSAMTrainer", "configuration": "2d"}),
    ("samunet_predict", ["-m", "results/D/T__P__2d"], {"model_folder": "results/D/T__P__2d"}),
    ("samunet_predict", ["-f", "0", "3", "all"], {"folds": [0, 3, "all"]}),
    ("samunet_predict", ["-step_size", "0.25"], {"step_size": 0.25}),
    ("samunet_predict", ["--disable_tta"], {"disable_tta": True}),
    ("samunet_predict", ["--verbose"], {"verbose": True}),
    ("samunet_predict", ["--save_probabilities"], {"save_probabilities": True}),
    ("samunet_predict", ["--continue_prediction"], {"continue_prediction": True}),
    ("samunet_predict", ["--c"], {"continue_prediction": True}),
    ("samunet_predict", ["-chk", "checkpoint_best.pth"], {"checkpoint": "checkpoint_best.pth"}),
    ("samunet_predict", ["-npp", "2", "-nps", "0"], {"npp": 2, "nps": 0}),
    ("samunet_predict", ["-num_parts", "4", "-part_id", "3"], {"num_parts": 4, "part_id": 3}),
    ("samunet_predict", ["-device", "cpu"], {"device": "cpu"}),
    ("samunet_predict", ["--disable_progress_bar"], {"disable_progress_bar": True}),
    ("samunet_predict", ["--not_on_device"], {"not_on_device": True}),
    # nnUNetv2_plan_and_preprocess
    ("samunet_plan_and_preprocess", ["-d", "218", "219"], {"dataset": ["218", "219"]}),
    ("samunet_plan_and_preprocess", ["-fpe", "DatasetFingerprintExtractor"], {"fpe": "DatasetFingerprintExtractor"}),
    ("samunet_plan_and_preprocess", ["-npfp", "3"], {"npfp": 3}),
    ("samunet_plan_and_preprocess", ["--verify_dataset_integrity"], {"verify_dataset_integrity": True}),
    ("samunet_plan_and_preprocess", ["--no_pp"], {"no_pp": True}),
    ("samunet_plan_and_preprocess", ["--clean"], {"clean": True}),
    ("samunet_plan_and_preprocess", ["-pl", "SAMPlanner"], {"pl": "SAMPlanner"}),
    ("samunet_plan_and_preprocess", ["-gpu_memory_target", "24"], {"gpu_memory_gb": 24.0}),
    ("samunet_plan_and_preprocess", ["-preprocessor_name", "DefaultPreprocessor"],
     {"preprocessor_name": "DefaultPreprocessor"}),
    ("samunet_plan_and_preprocess", ["-overwrite_plans_name", "samunetPlans_24G"], {"plans_name": "samunetPlans_24G"}),
    ("samunet_plan_and_preprocess", ["-c", "2d"], {"configuration": ["2d"]}),
    ("samunet_plan_and_preprocess", ["-np", "4"], {"num_processes": [4]}),
    ("samunet_plan_and_preprocess", ["--verbose"], {"verbose": True}),
    ("samunet_plan_and_preprocess", ["--no_pbar"], {"no_pbar": True}),
    # nnUNetv2_ensemble
    ("samunet_ensemble", ["-np", "3"], {"np": 3}),
    ("samunet_ensemble", ["--save_npz"], {"save_probabilities": True}),
    # nnUNetv2_evaluate_folder GT PRED
    ("samunet_evaluate", ["gt", "pred", "-djfile", "dataset.json", "-pfile", "plans.json"],
     {"gt_folder": "gt", "pred_folder": "pred", "djfile": "dataset.json", "pfile": "plans.json"}),
    ("samunet_evaluate", ["-o", "s.json", "-np", "2"], {"o": "s.json", "np": 2}),
    ("samunet_evaluate", ["--chill"], {"chill": True}),
    # nnUNetv2_find_best_configuration DATASET
    ("samunet_find_best", ["218"], {"dataset_name_or_id": "218"}),
    ("samunet_find_best", ["-p", "a", "b"], {"plans": ["a", "b"]}),
    ("samunet_find_best", ["-c", "2d", "3d_fullres"], {"c": ["2d", "3d_fullres"]}),
    ("samunet_find_best", ["-tr", "SAMedTrainer", "HSAMTrainer"], {"tr": ["SAMedTrainer", "HSAMTrainer"]}),
    ("samunet_find_best", ["-np", "4"], {"np": 4}),
    ("samunet_find_best", ["-f", "0", "1"], {"f": [0, 1]}),
    ("samunet_find_best", ["--disable_ensembling"], {"ensembles": False}),
    ("samunet_find_best", ["--no_overwrite"], {"no_overwrite": True}),
    # nnUNetv2_apply_postprocessing / nnUNetv2_determine_postprocessing
    ("samunet_apply_postprocessing", ["-np", "2", "-plans_json", "p.json", "-dataset_json", "d.json"],
     {"np": 2, "plans_json": "p.json", "dataset_json": "d.json", "pp_pkl_file": "p"}),
    ("samunet_determine_postprocessing", ["-plans_json", "p.json", "-dataset_json", "d.json", "-np", "2",
                                          "--remove_postprocessed"],
     {"plans_json": "p.json", "dataset_json": "d.json", "np": 2, "remove_postprocessed": True}),
]

# samunet's own spellings are aliases of the same options
SAMUNET_ALIASES = [
    ("samunet_train", ["--pretrained-weights", "m.pth", "--val-best", "--disable-checkpointing", "--trainer", "X",
                       "--plans", "P", "--device", "cpu"],
     {"pretrained_weights": "m.pth", "val_best": True, "disable_checkpointing": True, "trainer": "X", "plans": "P",
      "device": "cpu"}),
    ("samunet_predict", ["--step-size", "0.3", "--disable-tta", "--save-probabilities", "--continue-prediction",
                         "--num-parts", "2", "--part-id", "1", "--disable-progress-bar", "--not-on-device",
                         "--checkpoint", "c.pth", "--folds", "1"],
     {"step_size": 0.3, "disable_tta": True, "save_probabilities": True, "continue_prediction": True,
      "num_parts": 2, "part_id": 1, "disable_progress_bar": True, "not_on_device": True, "checkpoint": "c.pth",
      "folds": [1]}),
    ("samunet_plan_and_preprocess", ["--gpu-memory-gb", "12", "--plans-name", "P", "--num-processes", "3",
                                     "--no-pp", "--no-pbar"],
     {"gpu_memory_gb": 12.0, "plans_name": "P", "num_processes": [3], "no_pp": True, "no_pbar": True}),
    ("samunet_ensemble", ["--save-probabilities"], {"save_probabilities": True}),
    ("samunet_evaluate", ["-ref", "gt", "-pred", "pred", "-d", "218"], {"ref": "gt", "pred": "pred", "d": "218"}),
    ("samunet_find_best", ["-d", "218", "--ensembles", "--plans", "P"],
     {"d": "218", "ensembles": True, "plans": ["P"]}),
]


def _parse(command: str, arguments: list[str]) -> argparse.Namespace:
    build, required = PARSERS[command]
    return build().parse_args([*required, *arguments])


@pytest.mark.parametrize("command, arguments, expected", NNUNET_SPELLINGS + SAMUNET_ALIASES,
                         ids=[f"{c}:{' '.join(a)}" for c, a, _ in NNUNET_SPELLINGS + SAMUNET_ALIASES])
def test_nnunet_spellings_and_samunet_aliases_set_the_same_option(command, arguments, expected):
    namespace = _parse(command, arguments)
    assert {dest: getattr(namespace, dest) for dest in expected} == expected


def _value_for(action: argparse.Action) -> tuple[str, object]:
    """A valid command-line value for ``action`` and what it parses to."""
    text = {int: "2", float: "0.5"}.get(action.type, "x")
    if action.type is not None and action.type not in (int, float):
        text = "2" if action.dest not in ("device",) else "cpu"
    if action.choices:
        text = list(action.choices)[0]
    value = action.type(text) if action.type is not None else text
    return text, [value] if action.nargs in ("+", "*") else value


SINGLE_DASH_OPTIONS = [(command, action.dest, option)
                       for command, (build, _) in PARSERS.items()
                       for action in build()._actions
                       for option in action.option_strings
                       if option.startswith("-") and not option.startswith("--") and len(option) > 2
                       and action.nargs != 0 and not hasattr(action, "reason")]


@pytest.mark.parametrize("command, dest, option", SINGLE_DASH_OPTIONS,
                         ids=[f"{c}:{o}=" for c, _, o in SINGLE_DASH_OPTIONS])
def test_single_dash_long_options_with_equals_reach_their_own_option(command, dest, option):
    """``-pretrained_weights=model.pth`` used to be ``-p retrained_weights=model.pth``; every single-dash
    long option written with '=' must land in its own destination (next to short options like -p, -c, -d)."""
    build, required = PARSERS[command]
    action = next(a for a in build()._actions if option in a.option_strings)
    text, value = _value_for(action)
    namespace = build().parse_args([*[r for r in required if r != option], f"{option}={text}"]
                                   if option not in required else
                                   [*required[:required.index(option)], *required[required.index(option) + 2:],
                                    f"{option}={text}"])
    assert getattr(namespace, dest) == value


@pytest.mark.parametrize("command, arguments", [
    ("samunet_train", ["-pretrained=model.pth"]),  # an abbreviation is not -p + "retrained=model.pth"
    ("samunet_train", ["-pretrained_weight", "model.pth"]),
    ("samunet_train", ["-pmyPlans"]),
    ("samunet_predict", ["-part", "1"]),
    ("samunet_predict", ["-chkpoint", "x"]),
    ("samunet_predict", ["-num_gpus", "2"]),
    ("samunet_plan_and_preprocess", ["-gpu_memory", "8"]),
])
def test_misspelled_single_dash_options_are_refused_not_split(command, arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(command, arguments)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("main, arguments, reason", [
    (predict.main, ["-i", "in", "-o", "out", "-d", "218", "-prev_stage_predictions", "prev"], "no cascade"),
    (plan_and_preprocess.main, ["-d", "218", "-overwrite_target_spacing", "1", "1", "1"], "3d_fullres"),
    (plan_and_preprocess.main, ["-d", "218", "-pl", "nnUNetPlannerResEncM"], "SAMPlanner"),
    (plan_and_preprocess.main, ["-d", "218", "-c", "2d", "3d_fullres"], "use -c 2d"),
    (plan_and_preprocess.main, ["-d", "218", "-np", "4", "8"], "one number per configuration"),
])
def test_options_samunet_cannot_honour_are_refused_in_one_line(main, arguments, reason, capsys, tmp_path,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(arguments) == 2
    message = capsys.readouterr().err
    assert reason in message and message.count("\n") == 1 and "Traceback" not in message
