"""What a user of any PyPI package expects: `--version` on every command line (one helper),
one version, the license file and expression in the metadata, and `py.typed`."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from pathlib import Path

import pytest

import ong_kernels
from ong_kernels import mask_cli
from ong_kernels.train import cli, main_job

PARSERS = {
    "ong-mask": mask_cli.build_parser,
    "ong-train": cli.build_train_parser,
    "ong-sweep": cli.build_sweep_parser,
    "python -m ong_kernels.train.main_job": main_job.build_parser,
}


@pytest.mark.parametrize("prog", list(PARSERS))
def test_every_cli_prints_its_version(prog, capsys):
    with pytest.raises(SystemExit) as stop:
        PARSERS[prog]().parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {ong_kernels.__version__}"


def test_installed_metadata_has_one_version_and_the_license():
    meta = importlib.metadata.metadata("ong_kernels")
    assert meta["Version"] == ong_kernels.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    text = (Path(__file__).parents[1] / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text


def test_package_is_marked_typed():
    assert importlib.resources.files("ong_kernels").joinpath("py.typed").is_file()
