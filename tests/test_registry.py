"""samunet's registries: lazy, explicit, duplicates refused, and safe to re-import by path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import samunet.trainers.h_sam as h_sam_trainers
from samunet.errors import UnknownNameError
from samunet.registry import TRAINERS, Registry


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="SAMedTrainer"):
        TRAINERS.get("NoSuchTrainer")


def test_another_class_under_a_taken_name_is_refused():
    registry: Registry = Registry("thing")

    @registry.register("A")
    class First:
        pass

    with pytest.raises(ValueError, match="registered twice"):
        @registry.register("A")
        class Second:
            pass


def test_a_trainer_file_imported_again_under_another_module_name_keeps_the_first_registration(monkeypatch):
    """nnunetv2's nnUNet_extTrainer search puts a folder on sys.path and imports its files by their own
    names; a samunet trainer file imported that way must not raise "registered twice"."""
    names = TRAINERS.names()
    original = TRAINERS.get("HSAMTrainer_none_hpd_cm")
    path = Path(h_sam_trainers.__file__)
    spec = importlib.util.spec_from_file_location("h_sam", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "h_sam", module)
    spec.loader.exec_module(module)
    assert module.HSAMTrainer_none_hpd_cm is not original
    assert TRAINERS.get("HSAMTrainer_none_hpd_cm") is original
    assert TRAINERS.names() == names
