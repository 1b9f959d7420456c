"""The reference trainer: sparsify a CIFAR ResNet (at initialisation, or during training
through the seam of :mod:`.sparsifiers`: GMP, budgeted IMP, GSM, LC, BIMP's final cut), train
it with FusedMaskedSGD, and compare ONG with dense training and the other methods.

Command lines: ``ong-train`` (:func:`cli.train_main`), ``ong-sweep``
(:func:`cli.sweep_main`), ``python -m ong_kernels.train`` and the main job
``python -m ong_kernels.train.main_job``. From Python::

    from ong_kernels.train import TrainConfig, Trainer
    results = Trainer(TrainConfig(model="resnet20", dataset="fashion-mnist", method="ong",
                                  sparsity=0.9, epochs=10, run_dir="runs/r20")).fit()

Importing this package loads neither matplotlib nor tqdm; they are imported when used.
"""

from .config import PRESETS, TrainConfig
from .data import DATASETS, DatasetError, ImageDataset, load_dataset
from .models import MODELS, build_model
from .trainer import SparsityError, StopTraining, Trainer, train

__all__ = [
    "DATASETS",
    "MODELS",
    "PRESETS",
    "DatasetError",
    "ImageDataset",
    "SparsityError",
    "StopTraining",
    "TrainConfig",
    "Trainer",
    "build_model",
    "load_dataset",
    "train",
]
