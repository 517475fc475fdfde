"""Data-free / web-data KD setting (KD³): original data for the teacher only, a shifted web pool for
the student, evaluation on the original test split."""

from kdforge.tasks.datafree.data import KINDS, DataFreeData, build_datafree, restyle, shuffle_tiles
from kdforge.tasks.datafree.model import TinyCNN

__all__ = ["KINDS", "DataFreeData", "TinyCNN", "build_datafree", "restyle", "shuffle_tiles"]
