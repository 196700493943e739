"""samunet stays clear of torchvision/timm, has no import side effects, and fills in default folders."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from samunet.paths import ensure_nnunet_paths, weights_folder

ALL_COMMAND_MODULES = ["samunet.cli.plan_and_preprocess", "samunet.cli.train", "samunet.cli.predict",
                       "samunet.cli.evaluate", "samunet.cli.weights", "samunet.cli.demo", "samunet.cli.convert",
                       "samunet.cli.cv_summary", "samunet.cli.export_submission", "samunet.cli.find_best",
                       "samunet.cli.ensemble", "samunet.cli.train_cv", "samunet.cli.postprocessing",
                       "samunet.cli.overlays"]


def test_importing_and_building_everything_never_imports_torchvision_or_timm():
    code = ("import sys, os\n"
            "os.environ.setdefault('nnUNet_raw', '/nonexistent')\n"
            f"for name in {ALL_COMMAND_MODULES!r}: __import__(name)\n"
            "import samunet.trainers, samunet.planners.sam_planner, samunet.networks.samed\n"
            "from samunet.backbones.catalog import get_backbone_spec\n"
            "from samunet.backbones.sam import build_sam_parts\n"
            "for b in ('vit_test', 'tinyvit_test'): build_sam_parts(get_backbone_spec(b), 64)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_importing_samunet_reads_no_environment_and_imports_no_torch():
    code = "import sys, samunet; print('torch' in sys.modules, 'nnunetv2' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_unset_folders_get_embedded_defaults_announced_once(tmp_path, monkeypatch, caplog):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "SAMUNET_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    import samunet.paths
    monkeypatch.setattr(samunet.paths, "_announced", set())
    with caplog.at_level(logging.WARNING, logger="samunet.paths"):
        folders = ensure_nnunet_paths()
        ensure_nnunet_paths()
        weights = weights_folder()
    assert folders["nnUNet_raw"] == Path(tmp_path) / "samunet_data" / "nnUNet_raw"
    assert os.environ["nnUNet_results"] == str(Path(tmp_path) / "samunet_data" / "nnUNet_results")
    assert weights == Path(tmp_path) / "samunet_weights"
    assert sum("nnUNet_raw is not set" in r.message for r in caplog.records) == 1


def test_folders_the_user_set_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "mine"))
    assert ensure_nnunet_paths()["nnUNet_raw"] == tmp_path / "mine"
