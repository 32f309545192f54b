"""Image grids of synthetic sets: the classic per-class picture, one class per row.

Sets are stored in the dataset's normalised (and possibly ZCA-whitened) space. Undoing ZCA
needs the whitening fitted on the real train split, so the dataset is loaded for it when
its files are present; otherwise the grid is only de-normalised (with the mean/std the set
carries in its meta), each image min-max scaled so it stays visible, and the title says so.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dd_bench.data import load_dataset
from dd_bench.method import SyntheticSet

log = logging.getLogger(__name__)


def write_grids(frame: pd.DataFrame, directory: str | Path, out_dir: str | Path, data_root: str | Path = "data",
                max_per_class: int = 10) -> list[Path]:
    """One PNG per finished cell's final synthetic set (the full-dataset reference is skipped)."""
    directory, out_dir = Path(directory), Path(out_dir)
    written = []
    finals = frame[(frame["status"] == "ok") & frame["final"]].drop_duplicates(["cell_id", "ipc"])
    for r in finals.itertuples():
        if not r.synthetic_set:
            continue
        path = directory / r.synthetic_set
        if not path.exists():
            log.warning("grids: %s %s ipc=%d seed=%d: set %s is missing", r.label, r.dataset, r.ipc, r.seed, path)
            continue
        syn = SyntheticSet.load(path)
        if syn.meta.get("ipc_ignored"):
            log.info("grids: %s is the whole training set, not drawn", r.label)
            continue
        name = f"{r.label}_{r.dataset}_ipc{r.ipc}_seed{r.seed}"
        deployed = f" (deployed; adapted at IPC {r.adapt_ipc})" if r.ipc != r.adapt_ipc else ""
        title = f"{r.label} · {r.dataset} · IPC {r.ipc}{deployed} · seed {r.seed}"
        out = out_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png"
        written.append(save_grid(syn, out, title, r.dataset, r.dataset_info, data_root, max_per_class))
    return written


def to_pixels(syn: SyntheticSet, dataset: str, dataset_info: dict[str, Any],
              data_root: str | Path = "data") -> tuple[torch.Tensor, str]:
    """Images in [0, 1] for display, and a note saying how they were mapped back."""
    images = syn.images.detach().float().cpu()
    zca = bool(syn.meta.get("zca", dataset_info.get("zca", False)))
    if zca:
        try:
            data = load_dataset(dataset, root=data_root, zca=True, zca_mode=dataset_info.get("zca_mode") or "trace",
                                zca_reg=dataset_info.get("zca_reg") or 0.1)
            return data.denormalise(images), "de-ZCA'd, de-normalised"
        except Exception as error:  # data absent or unreadable: a weaker picture beats no picture
            log.warning("grids: cannot undo ZCA for %s (%s); de-normalising only", dataset, error)
    mean, std = syn.meta.get("mean"), syn.meta.get("std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        images = images * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
        if not zca:
            return images.clamp(0, 1), "de-normalised"
        note = "ZCA not undone (data unavailable): de-normalised, min-max scaled per image"
    else:
        note = "no mean/std in the set: min-max scaled per image"
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-8), note


def class_grid(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, max_per_class: int = 10,
               pad: int = 2) -> np.ndarray:
    """An (H, W, C) canvas: row c holds the first ``max_per_class`` images of class c, white between."""
    _, channels, height, width = pixels.shape
    per_class = [torch.nonzero(labels == c, as_tuple=True)[0][:max_per_class] for c in range(num_classes)]
    columns = max((len(i) for i in per_class), default=0) or 1
    canvas = np.ones((num_classes * (height + pad) + pad, columns * (width + pad) + pad, channels), dtype=np.float32)
    for row, indices in enumerate(per_class):
        for col, index in enumerate(indices.tolist()):
            top, left = pad + row * (height + pad), pad + col * (width + pad)
            canvas[top : top + height, left : left + width] = pixels[index].permute(1, 2, 0).numpy()
    return canvas


def save_grid(syn: SyntheticSet, path: str | Path, title: str, dataset: str, dataset_info: dict[str, Any],
              data_root: str | Path = "data", max_per_class: int = 10) -> Path:
    """Draw ``syn`` as a class-per-row grid into ``path`` (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels, note = to_pixels(syn, dataset, dataset_info, data_root)
    labels = syn.hard_labels().cpu()
    num_classes = int(dataset_info.get("num_classes") or int(labels.max()) + 1)
    canvas = class_grid(pixels, labels, num_classes, max_per_class)
    most = max(int((labels == c).sum()) for c in range(num_classes))
    if most > max_per_class:
        note += f"; first {max_per_class} of {most} per class"
    if syn.soft_labels:
        note += "; soft labels, rows by argmax"
    rows, columns = num_classes, max(1, min(most, max_per_class))
    inch = 0.45 if rows <= 20 else 0.25
    fig = Figure(figsize=(max(3.5, columns * inch + 0.8), rows * inch + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = canvas[..., 0] if canvas.shape[2] == 1 else canvas
    ax.imshow(image, cmap="gray" if canvas.shape[2] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    height = pixels.shape[2] + 2
    ax.set_yticks([2 + height * c + (height - 2) / 2 for c in range(num_classes)], [str(c) for c in range(num_classes)],
                  fontsize=6 if rows > 20 else 8)
    ax.set_xticks([])
    ax.set_ylabel("class")
    ax.set_title(f"{title}\n({note})", fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.savefig(path, dpi=150)
    return path
