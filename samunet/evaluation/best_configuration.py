"""The best model or pair of models by cross-validation, and its postprocessing (``samunet_find_best``).

nnunetv2's ``find_best_configuration`` for samunet models:

- the candidates are every (trainer, plans, configuration) asked for (nnU-Net's product of ``-tr``,
  ``-p`` and ``-c``); a configuration its plans do not hold is left out with a message, a missing
  model folder is an error;
- each candidate's validation predictions of the chosen folds are gathered into
  ``MODEL/crossval_results_folds_<folds>`` (nnunetv2's ``accumulate_cv_results`` layout, with
  dataset.json and plans.json) and scored with samunet's metrics: foreground Dice, the mean of the
  class means over all cross-validation cases (for the five folds 0-4 through the model's
  ``cv_summary_samunet.json``, as ``samunet_cv_summary`` computes it);
- with ensembling, each pair of candidates that has validation probabilities (trained with
  ``--npz``) is ensembled into ``ensembles/ensemble___A___B___<folds>`` (nnunetv2's name) and
  scored the same way; a tie goes to the simpler candidate;
- nnU-Net's connected-component postprocessing is determined on the winner's cross-validation
  predictions (:mod:`samunet.evaluation.postprocessing`) and written next to them, and the
  commands to predict, ensemble and postprocess are returned.

The gathered and ensembled folders are built in a scratch folder and replace the previous ones as a
whole once every file is complete (:mod:`samunet.staged_writes`), so a full disk never leaves a
folder that a later ``--no_overwrite`` run would take as complete.
"""
from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from samunet.errors import DatasetError
from samunet.evaluation.cv_summary import train_command
from samunet.evaluation.model_selection import model_identifier
from samunet.staged_writes import staged_outputs

logger = logging.getLogger(__name__)

ALL_FOLDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class TrainedModel:
    trainer: str
    plans: str
    configuration: str

    @property
    def identifier(self) -> str:
        return model_identifier(self.trainer, self.plans, self.configuration)


def folds_name(folds: Sequence[int]) -> str:
    return "_".join(str(f) for f in folds)


def candidate_models(trainers: Sequence[str], configurations: Sequence[str],
                     plans: Sequence[str]) -> list[TrainedModel]:
    """nnU-Net's order: for each trainer, each configuration, each plans identifier."""
    models = [TrainedModel(t, p, c) for t in trainers for c in configurations for p in plans]
    repeated = sorted({m.identifier for m in models if models.count(m) > 1})
    if repeated:
        raise DatasetError(f"models are named more than once: {', '.join(repeated)}")
    return models


def available_models(models: Sequence[TrainedModel], dataset_folder: Path,
                     preprocessed: Path) -> tuple[list[TrainedModel], list[str]]:
    """The models whose plans hold their configuration (others are left out, said why); refuses a
    model whose folder does not exist (nnunetv2 does too)."""
    kept, notes = [], []
    for model in models:
        folder = dataset_folder / model.identifier
        plans_file = next((p for p in (preprocessed / f"{model.plans}.json", folder / "plans.json") if p.is_file()),
                          None)
        if plans_file is None:
            raise DatasetError(f"no plans {model.plans} for {dataset_folder.name} (looked in {preprocessed} and "
                               f"{folder}); plan and train the model first")
        configurations = json.loads(plans_file.read_text(encoding="utf-8"))["configurations"]
        if model.configuration not in configurations:
            notes.append(f"{model.identifier}: configuration {model.configuration} is not in {plans_file.name}")
            continue
        if not folder.is_dir():
            raise DatasetError(f"no trained model in {folder}; train the folds first "
                               f"(samunet_train_cv {folder.parent.name} {model.configuration} -tr {model.trainer} --npz)")
        kept.append(model)
    if not kept:
        raise DatasetError("none of the requested models exists: " + "; ".join(notes))
    return kept, notes


def _read_splits(preprocessed: Path) -> list[dict] | None:
    path = preprocessed / "splits_final.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def merge_cross_validation(model_folder: Path, folds: Sequence[int], output: Path, file_ending: str,
                           splits: list[dict] | None, overwrite: bool = True) -> list[str]:
    """nnunetv2's ``accumulate_cv_results`` without its evaluation: the folds' validation predictions
    copied into ``output`` with the model's dataset.json and plans.json; returns the cases.

    A fold without validation predictions, or (when splits_final.json exists) with some of its
    validation cases missing, is refused. With ``overwrite=False`` an existing complete folder is kept;
    otherwise the new folder is staged and replaces it as a whole (:func:`samunet.staged_writes.
    staged_outputs`): a full disk raises OSError naming the file and leaves the previous folder.
    """
    expected: dict[int, set[str] | None] = {}
    for fold in folds:
        validation = model_folder / f"fold_{fold}" / "validation"
        if not validation.is_dir():
            raise DatasetError(f"fold {fold} of {model_folder.name} has no validation predictions ({validation}); "
                               f"train it: {train_command(model_folder, fold, '--npz')}")
        present = {p.name[:-len(file_ending)] for p in validation.glob(f"*{file_ending}")}
        if splits is not None:
            if fold >= len(splits):
                raise DatasetError(f"splits_final.json has no fold {fold}")
            lacking = sorted(set(splits[fold]["val"]) - present)
            if lacking:
                raise DatasetError(f"fold {fold} of {model_folder.name} lacks {len(lacking)} validation "
                                   f"prediction(s): {', '.join(lacking[:10])}; re-run its validation (--val)")
        expected[fold] = present
    cases = sorted(set().union(*expected.values()))
    if not overwrite and output.is_dir() and all((output / f"{c}{file_ending}").is_file() for c in cases):
        return cases
    name = output.name
    with staged_outputs(output.parent, whole=(name,)) as staging:
        for meta in ("dataset.json", "plans.json"):
            shutil.copy(model_folder / meta, staging.path(f"{name}/{meta}"))
        for fold in folds:
            for case in sorted(expected[fold]):
                target = staging.path(f"{name}/{case}{file_ending}")
                if target.exists():
                    raise DatasetError(f"case {case} is predicted by more than one of the folds {list(folds)} of "
                                       f"{model_folder.name}; check splits_final.json")
                shutil.copy(model_folder / f"fold_{fold}" / "validation" / target.name, target)
    return cases


def predict_command(dataset: str, model: TrainedModel, folds: Sequence[int], output: str,
                    save_probabilities: bool = False) -> str:
    command = (f"samunet_predict -d {dataset} -i INPUT_FOLDER -o {output} -f {' '.join(str(f) for f in folds)} "
               f"-tr {model.trainer} -c {model.configuration} -p {model.plans}")
    return command + (" --save_probabilities" if save_probabilities else "")


def find_best(dataset_name: str, results: Path, preprocessed: Path, models: Sequence[TrainedModel], *,
              ensembles: bool = True, folds: Sequence[int] = ALL_FOLDS, num_processes: int = 1,
              recompute: bool = False, overwrite: bool = True, postprocessing: bool = True) -> dict:
    """Rank the models (and with ``ensembles`` every pair of them) by cross-validation foreground Dice,
    determine the winner's postprocessing, and return the ranking with the inference commands."""
    from samunet.evaluation.model_selection import (cv_foreground_dice, ensemble_cross_validation,
                                                    score_predictions, validation_probability_files)
    from samunet.evaluation.postprocessing import PP_JSON, PP_PICKLE, determine_postprocessing
    folds = tuple(int(f) for f in folds)
    if len(set(folds)) != len(folds):
        raise DatasetError(f"folds are named more than once: {list(folds)}")
    dataset_folder = results / dataset_name
    models, notes = available_models(models, dataset_folder, preprocessed)
    first = dataset_folder / models[0].identifier
    dataset_json = json.loads(((first / "dataset.json") if (first / "dataset.json").is_file()
                               else preprocessed / "dataset.json").read_text(encoding="utf-8"))
    ending = dataset_json["file_ending"]
    splits = _read_splits(preprocessed)
    references = preprocessed / "gt_segmentations"
    candidates = []
    for model in models:
        folder = dataset_folder / model.identifier
        merged = folder / f"crossval_results_folds_{folds_name(folds)}"
        cases = merge_cross_validation(folder, folds, merged, ending, splits, overwrite)
        if folds == ALL_FOLDS:
            dice = cv_foreground_dice(folder, preprocessed, dataset_json, recompute=recompute,
                                      num_processes=num_processes)
        else:
            dice = score_predictions(merged, references, cases, dataset_json, num_processes)
        candidates.append({"name": model.identifier, "members": [model.identifier], "foreground_dice": dice,
                           "source": str(merged)})
    skipped = {}
    if ensembles and len(models) > 1:
        probabilities = {}
        for model in models:
            found = validation_probability_files(dataset_folder / model.identifier, folds)
            if isinstance(found, str):
                skipped[model.identifier] = found
                logger.warning("%s is left out of the ensembles: %s", model.identifier, found)
            else:
                probabilities[model] = found
        for one, two in itertools.combinations([m for m in models if m in probabilities], 2):
            name = f"ensemble___{one.identifier}___{two.identifier}___{folds_name(folds)}"
            output = dataset_folder / "ensembles" / name
            member_folders = [dataset_folder / one.identifier, dataset_folder / two.identifier]
            cases = sorted(set(probabilities[one]) | set(probabilities[two]))
            if overwrite or not all((output / f"{c}{ending}").is_file() for c in cases):
                cases = ensemble_cross_validation(member_folders, output, [probabilities[one], probabilities[two]],
                                                  num_processes)
            dice = score_predictions(output, references, cases, dataset_json, num_processes)
            candidates.append({"name": name, "members": [one.identifier, two.identifier],
                               "foreground_dice": dice, "source": str(output)})
    ranking = sorted(candidates, key=lambda c: -c["foreground_dice"])  # stable: singles win ties
    best = ranking[0]
    source = Path(best["source"])
    post = None
    if postprocessing:
        functions, kwargs = determine_postprocessing(source, references, source / "plans.json",
                                                     source / "dataset.json", num_processes=num_processes)
        record = json.loads((source / PP_JSON).read_text(encoding="utf-8"))
        post = {"file": str(source / PP_PICKLE), "summary": str(source / PP_JSON),
                "functions": [f.__name__ for f in functions], "kwargs": kwargs,
                "nnunet_foreground_dice_before": record["input_folder"]["foreground_mean"]["Dice"],
                "nnunet_foreground_dice_after": record["postprocessed"]["foreground_mean"]["Dice"]}
    dataset_id = dataset_name[len("Dataset"):].split("_")[0] if dataset_name.startswith("Dataset") else dataset_name
    by_identifier = {m.identifier: m for m in models}
    members = [by_identifier[i] for i in best["members"]]
    if len(members) == 1:
        outputs = ["OUTPUT_FOLDER"]
        commands = [predict_command(dataset_id, members[0], folds, "OUTPUT_FOLDER")]
    else:
        outputs = [f"OUTPUT_FOLDER_MODEL_{i + 1}" for i in range(len(members))]
        commands = [predict_command(dataset_id, m, folds, o, save_probabilities=True)
                    for m, o in zip(members, outputs)]
        commands.append(f"samunet_ensemble -i {' '.join(outputs)} -o OUTPUT_FOLDER -np {num_processes}")
    if post is not None:
        commands.append(f"samunet_apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP -pp_pkl_file "
                        f"{post['file']} -np {num_processes} -plans_json {source / 'plans.json'}")
    return {"dataset": dataset_name, "folds": list(folds),
            "considered_models": [m.identifier for m in models], "left_out_models": notes,
            "metric": "cross-validation foreground Dice (mean of class means, samunet's metrics)",
            "ensembles_evaluated": ensembles, "left_out_of_ensembles": skipped, "ranking": ranking, "best": best,
            "postprocessing": post, "commands": commands}
