"""The package's version, in one place: pyproject.toml reads it (setuptools' `attr`),
`ong_kernels.__version__` and every command line's ``--version`` (``cli_parser``) show it."""

from __future__ import annotations

import argparse

__version__ = "0.1.0"


def cli_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """Every command line's parser, with ``--version`` (print "<prog> <version>", exit 0)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser
