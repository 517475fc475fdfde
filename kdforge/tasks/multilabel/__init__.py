"""Multi-label classification setting: procedural data, mAP, BCE task loss, label-wise model, the Task."""

from kdforge.tasks.multilabel.data import SHAPES, MultiLabelData, label_frequencies, procedural_multilabel
from kdforge.tasks.multilabel.metrics import (
    average_precision,
    mean_average_precision,
    per_class_average_precision,
)
from kdforge.tasks.multilabel.model import GroupFC, LabelWiseNet, QueryDecoder, labelwise_net
from kdforge.tasks.multilabel.train import (
    AugmentSpec,
    MultiLabelBCELoss,
    MultiLabelTask,
    evaluate,
    multilabel_bce_loss,
)

__all__ = [
    "SHAPES",
    "AugmentSpec",
    "GroupFC",
    "LabelWiseNet",
    "MultiLabelBCELoss",
    "MultiLabelData",
    "MultiLabelTask",
    "QueryDecoder",
    "average_precision",
    "evaluate",
    "label_frequencies",
    "labelwise_net",
    "mean_average_precision",
    "multilabel_bce_loss",
    "per_class_average_precision",
    "procedural_multilabel",
]
