"""Checks of a trained model folder before prediction builds anything from it.

A model folder (``$nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION``, or ``-m FOLDER``) holds
``plans.json``, ``dataset.json`` and ``fold_N/<checkpoint>`` for each fold used. What goes wrong with
one in practice: it was copied without its JSON files, a fold was never trained (or only has
``checkpoint_best.pth`` / ``checkpoint_latest.pth``), a checkpoint was cut off by an interrupted copy or
download. Each is refused in one line naming the file and how to fix it.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Sequence

from samunet.errors import DatasetError

MODEL_FILES = ("plans.json", "dataset.json")


def _layout(folder: Path) -> str:
    return (f"a trained model folder TRAINER__PLANS__CONFIGURATION holds {' and '.join(MODEL_FILES)} and "
            f"fold_N/checkpoint_final.pth (samunet_train writes them; copy the whole folder)")


def _train_command(folder: Path, fold: int | str) -> str:
    parts = folder.resolve().name.split("__")
    if len(parts) != 3:
        return "samunet_train"
    trainer, plans, configuration = parts
    return f"samunet_train {folder.resolve().parent.name} {configuration} {fold} -tr {trainer} -p {plans}"


def _check_json(path: Path, folder: Path) -> None:
    if not path.is_file():
        raise DatasetError(f"{path} is missing: {_layout(folder)}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path} is unreadable (cut off by an interrupted copy?): {error}; copy it again "
                           f"from the trained model") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path} does not hold a JSON object; copy it again from the trained model")


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete PyTorch checkpoint (torch.save's zip archive: its directory sits
    at the end, so a cut-off file has none), or None. Reads the archive's directory only."""
    if path.stat().st_size == 0:
        return "it is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"it is cut off or not a PyTorch checkpoint ({error})"
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return "it is a zip archive but not a PyTorch checkpoint (no data.pkl)"
    return None


def check_model_folder(folder: str | Path, folds: Sequence[int | str], checkpoint_name: str) -> None:
    """Refuse (DatasetError, one line) a model folder without ``plans.json`` / ``dataset.json`` (missing or
    unreadable), without ``fold_F/checkpoint_name`` for one of ``folds`` (naming the checkpoints that fold
    does have), or with a checkpoint that is empty, cut off or not a PyTorch checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"model folder {folder} does not exist; train the model with samunet_train or give "
                           f"the folder that holds it")
    for name in MODEL_FILES:
        _check_json(folder / name, folder)
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint_name
        if not path.is_file():
            others = sorted(p.name for p in path.parent.glob("*.pth")) if path.parent.is_dir() else []
            hint = f"; fold_{fold} holds {', '.join(others)}: choose one with -chk" if others else ""
            raise DatasetError(f"{path} does not exist; train fold {fold} first ({_train_command(folder, fold)}) "
                               f"or choose other folds with -f{hint}")
        problem = checkpoint_problem(path)
        if problem:
            raise DatasetError(f"{path} is not a usable checkpoint: {problem}; copy it again, or train fold {fold} "
                               f"again ({_train_command(folder, fold)})")
