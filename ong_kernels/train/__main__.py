"""``python -m ong_kernels.train`` is ``ong-train``."""

import sys

from .cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
