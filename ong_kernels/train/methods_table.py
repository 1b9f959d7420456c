"""Every trainer method's sparsifier, by name: the one table the trainer builds from.

Its own module because the reparametrisation methods (reparam.py) build on the seam's
classes (sparsifiers.py): importing both here keeps either from importing the other back.
"""

from __future__ import annotations

from ong_kernels.pruning import methods as M

from . import reparam, sparsifiers

CLASSES = {**sparsifiers.CLASSES, **reparam.CLASSES}


def build_sparsifier(host: sparsifiers.SeamHost) -> sparsifiers.Sparsifier:
    """The sparsifier of the host's method, with its resolved settings."""
    cfg = host.config
    settings = M.resolve_settings(cfg.method, cfg.method_kwargs)
    cls = sparsifiers.OneShot if M.spec(cfg.method).one_shot else CLASSES[cfg.method]
    return cls(host, settings)
