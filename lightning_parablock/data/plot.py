"""A picture of a federated split: clients × labels, so label skew is seen at a glance rather than read off a table."""

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_parablock.data.partition import label_histogram, label_values

_MAX_ANNOTATED_CELLS = 400


def plot_partition(
    partition: Sequence[Sequence[int]],
    labels: Sequence[Hashable],
    path: Union[str, Path],
    title: Optional[str] = None,
    label_name: str = "label",
) -> Path:
    """Write a heatmap PNG: one row per client, one column per label, each cell the client's example count.

    Rows are annotated with the client's size; cells with their count while the grid is small enough to read.
    ``label_name`` titles the label axis (the column split by, or ``cluster``).
    Drawn on an Agg canvas directly, so it works headless and never touches pyplot's global state.

    Returns:
        The path written.
    """
    if not partition:
        raise ValueError("`partition` is empty; pass one list of indices per client.")
    values = label_values(labels[index] for part in partition for index in part)
    histograms = label_histogram(partition, labels)
    counts = np.array([[histogram.get(value, 0) for value in values] for histogram in histograms])
    num_clients, num_labels = counts.shape

    figure = Figure(figsize=(min(2 + 0.6 * num_labels, 24), min(1.5 + 0.35 * num_clients, 24)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="examples")
    axes.set_xticks(range(num_labels), [str(value) for value in values], rotation=45, ha="right")
    axes.set_yticks(range(num_clients), [f"{client} (n={len(part)})" for client, part in enumerate(partition)])
    axes.set_xlabel(label_name)
    axes.set_ylabel("client")
    axes.set_title(title or f"{num_clients} clients × {num_labels} labels")
    if counts.size <= _MAX_ANNOTATED_CELLS:
        threshold = counts.max() / 2
        for (row, column), count in np.ndenumerate(counts):
            color = "black" if count > threshold else "white"
            axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
