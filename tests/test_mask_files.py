"""Mask files: a damaged or missing file is a one-line error naming it; writes are atomic."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from ong_kernels import load_masks, save_masks
from ong_kernels.pruning import io

GOOD = {"format": io.FORMAT, "version": io.VERSION, "bit_order": "little"}
BYTES = {"a.weight": torch.zeros(2, dtype=torch.uint8)}  # 2 bytes: a (3, 4) mask


def _write(path, tensors, **metadata):
    save_file(tensors, str(path), metadata={**GOOD, **metadata})
    return path


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        (BYTES, {}, "no 'shapes' in its metadata"),
        (BYTES, {"shapes": "{x"}, "'shapes' metadata is not valid JSON"),
        (BYTES, {"shapes": "[]"}, "'shapes' metadata is a list, not a dict"),
        (BYTES, {"shapes": '{"a.weight": [3, -4]}'}, "not a list of ints >= 0"),
        (BYTES, {"shapes": '{"a.weight": "3x4"}'}, "not a list of ints >= 0"),
        (BYTES, {"shapes": '{"b.weight": [3, 4]}'}, "no shape for ['a.weight']"),
        ({"a.weight": torch.zeros(1)}, {"shapes": '{"a.weight": [2, 4]}'}, "torch.float32"),
        (BYTES, {"shapes": '{"a.weight": [5, 4]}'}, "has 2 bytes, expected 3"),
    ],
)
def test_damaged_metadata_is_one_line_naming_the_file(tmp_path, tensors, metadata, message):
    path = _write(tmp_path / "m.safetensors", tensors, **metadata)
    with pytest.raises(ValueError) as err:
        load_masks(path)
    text = str(err.value)
    assert message in text and repr(str(path)) in text and "damaged" in text
    assert len(text.splitlines()) == 1


def test_a_folder_a_missing_file_and_a_foreign_file_name_the_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a masks file"):
        load_masks(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such masks file"):
        load_masks(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"12")
    with pytest.raises(ValueError, match=f"{junk}' is not a safetensors file"):
        load_masks(junk)


def test_save_is_atomic_and_never_touches_the_old_file_on_failure(tmp_path, fill_disk):
    path = tmp_path / "m.safetensors"
    mask = torch.rand(3, 5) > 0.5
    save_masks(path, {"w": mask})
    assert stat.S_IMODE(os.stat(path).st_mode) == io._FILE_MODE  # not mkstemp's 0600
    before = path.read_bytes()

    fill_disk()
    with pytest.raises(OSError, match="No space left"):
        save_masks(path, {"w": ~mask})
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary file left
    assert torch.equal(load_masks(path)["w"], mask)


def test_save_into_a_folder_or_a_missing_folder_names_the_path(tmp_path):
    masks = {"w": torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_masks(tmp_path, masks)
    with pytest.raises(FileNotFoundError, match="cannot write into"):
        save_masks(tmp_path / "no" / "m.safetensors", masks)
    assert os.listdir(tmp_path) == []
