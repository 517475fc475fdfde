"""A picture of multi-label predictions: test images with true labels and the model's predicted labels."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdforge.tasks.common import predict, prepare_images
from kdforge.tasks.multilabel.data import MultiLabelData


def draw_predictions(model: nn.Module, data: MultiLabelData, path: Path, count: int = 12,
                     threshold: float = 0.5) -> bool:
    """PNG grid: each image titled with its labels; green = predicted and true, red = wrong, grey = missed."""

    from kdforge.plotting import pyplot, save_png

    plt = pyplot()

    count = min(count, len(data))
    probs = torch.sigmoid(predict(model, data.images[:count], count,
                                  lambda x: prepare_images(x, data.mean, data.std)))
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    cols = min(6, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        img = data.images[i].permute(1, 2, 0).numpy()
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        true = data.targets[i] > 0.5
        pred = probs[i] > threshold
        y = 1.02
        for c in range(data.num_classes):
            if not (true[c] or pred[c]):
                continue
            color = "green" if true[c] and pred[c] else ("red" if pred[c] else "grey")
            ax.text(0.0, y, f"{names[c]} {float(probs[i, c]):.2f}", color=color, fontsize=7,
                    transform=ax.transAxes)
            y += 0.12
    fig.suptitle("test images: green = hit, red = false positive, grey = missed (student p)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=80)
    return True
