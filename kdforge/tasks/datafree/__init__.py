"""Data-free / web-data KD setting (KD³): original data for the teacher only, a shifted web pool for
the student, evaluation on the original test split; its stages are Tasks of the one Trainer."""

from kdforge.tasks.datafree.data import KINDS, DataFreeData, DataFreeDataConfig, build_datafree, restyle, shuffle_tiles
from kdforge.tasks.datafree.model import TinyCNN
from kdforge.tasks.datafree.task import NORMS, DataFreeTask, SupervisedNet, SupervisedTask, WebBatch, tiny_cnn

__all__ = [
    "KINDS",
    "NORMS",
    "DataFreeData",
    "DataFreeDataConfig",
    "DataFreeTask",
    "SupervisedNet",
    "SupervisedTask",
    "TinyCNN",
    "WebBatch",
    "build_datafree",
    "restyle",
    "shuffle_tiles",
    "tiny_cnn",
]
