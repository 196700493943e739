"""Tests of the synthetic CT phantom dataset generator."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
from samunet.preprocessing import phantom
from samunet.preprocessing.phantom import LABELS, generate_case, write_phantom_dataset, write_tiny_phantom_dataset

ORGAN_LABELS = {name: value for name, value in LABELS.items() if value}


def _read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def _cases(folder, split):
    images = sorted((folder / f"images{split}").glob("*_0000.nii.gz"))
    labels = sorted((folder / f"labels{split}").glob("*.nii.gz"))
    return list(zip(images, labels))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_phantom_dataset(tmp_path_factory.mktemp("raw"))


def test_tiny_dataset_layout_and_nnunet_integrity(tiny):
    assert tiny.name == "Dataset991_PhantomTiny"
    dataset_json = json.loads((tiny / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    assert dataset_json["numTraining"] == 4 and dataset_json["file_ending"] == ".nii.gz"
    assert [p.name for p, _ in _cases(tiny, "Ts")] == ["case_0004_0000.nii.gz", "case_0005_0000.nii.gz"]
    assert len(_cases(tiny, "Tr")) == 4
    verify_dataset_integrity(str(tiny), num_processes=1)


def test_every_class_present_and_sizes_ordered(tiny):
    for _, label_file in _cases(tiny, "Tr") + _cases(tiny, "Ts"):
        labels, _ = _read(label_file)
        assert labels.dtype == np.uint8
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        kidneys, count = ndimage.label(labels == LABELS["kidney"])
        assert count == 2
        kidney_sizes = np.bincount(kidneys.ravel())[1:]
        liver, spleen = (labels == LABELS["liver"]).sum(), (labels == LABELS["spleen"]).sum()
        assert liver > spleen > kidney_sizes.max()


def _assert_contrast(image, labels, spacing_zyx):
    for name, value in ORGAN_LABELS.items():
        mask = labels == value
        distance = ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)
        shell = (distance > 0) & (distance <= 3.0) & (labels == 0)
        difference = image[mask].mean() - image[shell].mean()
        assert abs(difference) >= 40, f"{name}: organ differs from its surroundings by only {difference:.0f} HU"


def test_organs_contrast_with_their_surroundings(tiny):
    for image_file, label_file in _cases(tiny, "Tr"):
        image, spacing = _read(image_file)
        labels, _ = _read(label_file)
        assert image.dtype == np.int16
        _assert_contrast(image, labels, spacing[::-1])
    image, labels, spacing = generate_case((24, 96, 96), np.random.default_rng(1))
    _assert_contrast(image, labels, spacing)
    assert np.median(image[0, :3, :3]) == pytest.approx(-1000, abs=30)  # air corner
    assert not labels[0].any() and not labels[-1].any()  # organs cover a subset of slices


def test_spacing_is_anisotropic_and_stored(tiny):
    thicknesses = set()
    for image_file, label_file in _cases(tiny, "Tr"):
        image = sitk.ReadImage(str(image_file))
        assert image.GetSpacing()[:2] == (1.5, 1.5)
        assert 2.5 <= image.GetSpacing()[2] <= 3.5
        assert image.GetOrigin() == (0.0, 0.0, 0.0)
        assert sitk.ReadImage(str(label_file)).GetSpacing() == image.GetSpacing()
        thicknesses.add(image.GetSpacing()[2])
    assert len(thicknesses) > 1


def test_deterministic_given_seed(tmp_path):
    first = write_tiny_phantom_dataset(tmp_path / "a")
    second = write_tiny_phantom_dataset(tmp_path / "b")
    other = write_tiny_phantom_dataset(tmp_path / "c", seed=1)
    triples = zip(_cases(first, "Tr"), _cases(second, "Tr"), _cases(other, "Tr"))
    for (img_a, lab_a), (img_b, lab_b), (img_c, _) in triples:
        assert np.array_equal(_read(img_a)[0], _read(img_b)[0])
        assert np.array_equal(_read(lab_a)[0], _read(lab_b)[0])
        assert _read(img_a)[1] == _read(img_b)[1]
        assert not np.array_equal(_read(img_a)[0], _read(img_c)[0])


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    target = write_tiny_phantom_dataset(tmp_path)
    marker = target / "imagesTr" / "marker.txt"
    marker.write_text("kept")
    assert write_tiny_phantom_dataset(tmp_path) == target and marker.is_file()
    assert write_tiny_phantom_dataset(tmp_path, overwrite=True) == target
    assert not marker.exists() and (target / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_interrupted_run_leaves_no_half_dataset(tmp_path, monkeypatch):
    real_write = phantom._write_image
    calls = []

    def failing_write(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        real_write(*args)

    monkeypatch.setattr(phantom, "_write_image", failing_write)
    with pytest.raises(KeyboardInterrupt):
        write_tiny_phantom_dataset(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_phantom_dataset(tmp_path, shape=(4, 48, 48))
    with pytest.raises(ValueError, match="num_train"):
        write_phantom_dataset(tmp_path, num_train=0)
