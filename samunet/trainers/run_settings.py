"""The settings a fold's training was started with, kept next to its checkpoints.

``samunet_train`` writes ``samunet_settings.json`` into the fold folder (atomically) before the first
epoch: the trainer, the hyper-parameters, the ``--backbone`` / ``--depth`` / ``-pretrained_weights`` given,
and the data set / plans identity (:mod:`samunet.trainers.run_identity`). ``--c`` reads it, so a run killed
before its first checkpoint was complete continues with its own settings (and starts again from its
pretrained weights) instead of the trainer's defaults, and options that change the plans (``--backbone``,
``--depth``) need not be repeated.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from samunet.atomic_files import write_json_atomically
from samunet.errors import ConfigurationError

SETTINGS_FILE = "samunet_settings.json"
FORMAT = 1


@dataclass
class RunSettings:
    """What ``--c`` needs to continue a fold's training as it was started."""

    trainer: str
    hyperparameters: dict = field(default_factory=dict)
    backbone: str | None = None
    depth: int | None = None
    identity: dict = field(default_factory=dict)
    pretrained_weights: str | None = None  # -pretrained_weights of the run, loaded again by --c before a checkpoint

    def describe(self) -> str:
        """The settings in one line, for the log."""
        options = {**self.hyperparameters, **({"backbone": self.backbone} if self.backbone else {}),
                   **({"depth": self.depth} if self.depth is not None else {})}
        return ", ".join(f"{name}={value}" for name, value in sorted(options.items())) or "the trainer's defaults"


def write_run_settings(folder: str | os.PathLike, settings: RunSettings) -> Path:
    """Write ``settings`` into ``folder``/samunet_settings.json atomically; returns the file."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return write_json_atomically(Path(folder) / SETTINGS_FILE, {"format": FORMAT, **asdict(settings)})


def read_run_settings(folder: str | os.PathLike) -> RunSettings | None:
    """The settings recorded in ``folder`` (None when there are none). Raises ConfigurationError naming the
    file when it cannot be read."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        return RunSettings(**{key: value for key, value in content.items() if key != "format"})
    except (ValueError, TypeError) as error:
        raise ConfigurationError(f"{path} cannot be read ({type(error).__name__}: {error}); delete it to continue "
                                 f"with the options given on the command line") from error


# --c: hyper-parameters that define the experiment stay as the run recorded them (a change would leave its recorded
# setting wrong without a word); the labelled subset (labelled_*) is checked by
# samunet.trainers.labelled_subset.check_continued_labelled_subset. --c may change the length of the training
# (--num-epochs, --iters-per-epoch, --val-iters), its budget (--max-minutes: a new total), the precision (another
# machine) and --weights (no effect once a checkpoint exists: the network weights come from it).
KEPT_ON_CONTINUE = {"initial_lr": "--lr", "weight_decay": "weight_decay", "batch_size": "--batch-size"}
# --val validates the trained weights: these options only shape a training, so they are ignored (said in the log)
TRAINING_ONLY = {"labelled_fraction": "--labelled-fraction", "labelled_unit": "--labelled-unit",
                 "labelled_seed": "--labelled-seed", "max_minutes": "--max-minutes", "num_epochs": "--num-epochs",
                 "num_iterations_per_epoch": "--iters-per-epoch", "num_val_iterations_per_epoch": "--val-iters",
                 **KEPT_ON_CONTINUE}


def check_continue_options(recorded: dict, given: dict, defaults: dict, source: str) -> None:
    """``--c``: refuse options ``given`` that change a hyper-parameter the run ``recorded`` (in ``source``;
    ``defaults``: the trainer's values for those it did not record) and that defines the experiment: the
    labelled subset and :data:`KEPT_ON_CONTINUE`. Giving the recorded value again is accepted. Raises
    ConfigurationError in one line saying the run's value and how to go on."""
    from samunet.trainers.labelled_subset import check_continued_labelled_subset
    check_continued_labelled_subset(recorded, given, source)
    for name, option in KEPT_ON_CONTINUE.items():
        if given.get(name) is None:
            continue
        was = recorded.get(name, defaults.get(name))
        if was is not None and float(given[name]) == float(was):
            continue
        raise ConfigurationError(f"the run in {source} was trained with {option} "
                                 f"{'(the trainer default)' if was is None else was}; --c continues with it: leave "
                                 f"out {option} {given[name]}, or train {option} {given[name]} as a new run "
                                 f"(without --c, in another output folder: another nnUNet_results, or move this "
                                 f"fold folder away)")


def without_training_only(given: dict) -> tuple[dict, str | None]:
    """``--val``: ``given`` without :data:`TRAINING_ONLY` hyper-parameters, and the log line saying which were
    ignored (None when none were given)."""
    ignored = [option for name, option in TRAINING_ONLY.items() if given.get(name) is not None]
    kept = {name: value for name, value in given.items() if name not in TRAINING_ONLY}
    note = (f"{', '.join(ignored)} have no effect with --val (it validates the trained weights as they were "
            f"trained); ignored" if ignored else None)
    return kept, note
