"""ong_kernels: One-shot NMF-based Gradient masking (ONG) for PyTorch.

Batched NMF of every weight matrix of a model, a fused masked SGD optimizer, the ONG pruning
masks and the methods they are compared with, and a reference CIFAR ResNet trainer.
"""

from ong_kernels import _ops  # noqa: F401  (registers the torch.library ops)
from ong_kernels import pruning as _pruning
from ong_kernels._version import __version__
from ong_kernels.backends import registry as _registry
from ong_kernels.nmf import nmf_batched
from ong_kernels.optim import FusedMaskedSGD
from ong_kernels.pruning import *  # noqa: F403  (the pruning API: ong_kernels.pruning.__all__)


def backends_available(op: str | None = None) -> dict[str, bool]:
    """{backend: whether it can run here} over every op (or one op: "nmf_mu",
    "masked_sgd_step"). reference always; cpu when the extension is built; cuda when it is
    built with CUDA and a GPU is present; triton when triton is installed and a GPU is present
    (or TRITON_INTERPRET=1, on CPU tensors)."""
    return _registry.backends_available(op)


def __getattr__(name: str):
    """`ong_kernels.NMF`, the scikit-learn estimator (ong_kernels/estimator.py), imported on
    first use: scikit-learn is an optional extra, so `import ong_kernels` never needs it."""
    if name == "NMF":
        try:
            from ong_kernels.estimator import NMF
        except ImportError as exc:
            raise ImportError(
                f"ong_kernels.NMF needs scikit-learn ({exc}): pip install 'ong_kernels[sklearn]'"
            ) from exc
        return NMF
    raise AttributeError(f"module 'ong_kernels' has no attribute {name!r}")


__all__ = [  # noqa: F405  (NMF comes from __getattr__)
    "NMF",
    "FusedMaskedSGD",
    "__version__",
    "backends_available",
    "nmf_batched",
    *_pruning.__all__,
]
