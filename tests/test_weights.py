"""samunet.weights and samunet_weights: known checkpoints, verification, clear errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from samunet.cli.weights import main as weights_main
from samunet.weights import KNOWN_CHECKPOINTS, WeightsError, fetch, load_state_dict, resolve_checkpoint, \
    verify_checkpoint


def test_every_known_checkpoint_says_where_to_get_it():
    assert set(KNOWN_CHECKPOINTS) == {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "litemedsam"}
    for entry in KNOWN_CHECKPOINTS.values():
        assert entry.source and entry.filename.endswith(".pth")
        assert entry.sha256 is None or len(entry.sha256) == 64


def test_fetched_litemedsam_has_the_published_sha256(litemedsam_checkpoint):
    assert verify_checkpoint(litemedsam_checkpoint).name == "litemedsam"


def test_missing_file_names_the_file_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMUNET_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        resolve_checkpoint("sam_vit_b")
    message = str(error.value)
    assert "sam_vit_b_01ec64.pth" in message and "does not exist" in message
    assert "dl.fbaipublicfiles.com" in message


def test_truncated_file_is_refused_with_the_expected_size_and_sha256(litemedsam_checkpoint, tmp_path):
    truncated = tmp_path / "lite_medsam.pth"
    truncated.write_bytes(litemedsam_checkpoint.read_bytes()[:1000])
    with pytest.raises(WeightsError) as error:
        verify_checkpoint(truncated)
    assert "truncated" in str(error.value) and KNOWN_CHECKPOINTS["litemedsam"].sha256 in str(error.value)


def test_wrong_sha256_is_refused_naming_file_and_expected_hash(litemedsam_checkpoint, tmp_path):
    corrupt = tmp_path / "lite_medsam.pth"
    shutil.copy(litemedsam_checkpoint, corrupt)
    with open(corrupt, "r+b") as handle:
        handle.seek(5_000_000)
        byte = handle.read(1)
        handle.seek(5_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightsError) as error:
        verify_checkpoint(corrupt)
    message = str(error.value)
    assert str(corrupt) in message and KNOWN_CHECKPOINTS["litemedsam"].sha256 in message
    assert "samunet_weights fetch litemedsam" in message


def test_fetch_replaces_a_corrupt_copy_and_leaves_no_partial_files(tmp_path):
    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(b"not a checkpoint")
    good = fetch("litemedsam", tmp_path)
    assert verify_checkpoint(good).name == "litemedsam"
    assert [p.name for p in tmp_path.iterdir()] == ["lite_medsam.pth"]


def test_loading_refuses_pickled_code_and_garbage(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        load_state_dict(garbage)
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(WeightsError, match="state_dict of tensors"):
        load_state_dict(not_tensors)


def test_weights_cli_lists_verifies_and_fails_in_one_line(litemedsam_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAMUNET_WEIGHTS", str(tmp_path))
    assert weights_main(["list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in KNOWN_CHECKPOINTS)
    assert weights_main(["verify", str(litemedsam_checkpoint)]) == 0
    assert "OK (litemedsam)" in capsys.readouterr().out
    assert weights_main(["verify", str(tmp_path / "sam_vit_h_4b8939.pth")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and error.count("\n") == 1 and "sam_vit_h_4b8939.pth" in error
