"""reports.plots.annotated_heatmap: values written in the right cells, readable text colours, row 0 on top."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from PIL import Image

from reports.plots import annotated_heatmap, to_png


def test_annotated_heatmap_cells_text_and_orientation() -> None:
    m = np.array([[0.0, 1.0], [0.5, np.nan]])
    fig, ax = plt.subplots()
    image = annotated_heatmap(ax, m, vmin=0.0, vmax=1.0)
    texts = {(t.get_position(), t.get_text()): to_rgba(t.get_color()) for t in ax.texts}
    # viridis: 0 is dark purple and 0.5 dark teal (white text), 1 is yellow (dark text); NaN: no text.
    assert texts == {((0, 0), "0.00"): to_rgba("w"), ((1, 0), "1.00"): to_rgba(".15"),
                     ((0, 1), "0.50"): to_rgba("w")}
    assert ax.get_ylim() == (1.5, -0.5)  # row 0 drawn at the top, as in seaborn.heatmap
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    assert image.norm.vmin == 0.0 and image.norm.vmax == 1.0
    png = to_png(fig)
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_annotated_heatmap_scale_defaults_to_data_range_and_long_labels_lie_flat() -> None:
    m = np.array([[0.2, 0.3], [0.25, 0.4]])
    fig, ax = plt.subplots()
    image = annotated_heatmap(ax, m, cmap="rocket_r", annot=False, yticklabels=["T-shirt/top", "Trouser"])
    assert (image.norm.vmin, image.norm.vmax) == (0.2, 0.4)
    assert not ax.texts
    assert [t.get_rotation() for t in ax.get_yticklabels()] == [0.0, 0.0]
    plt.close(fig)
