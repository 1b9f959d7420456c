"""The package's version, in one place: pyproject.toml reads it (setuptools' `attr`),
`ong_kernels.__version__` and every command line's ``--version`` show it."""

from __future__ import annotations

import argparse

__version__ = "0.1.0"


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """``--version``: print "<prog> <version>" and exit 0, as every CLI of the package does."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
