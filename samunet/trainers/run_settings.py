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
