"""Small generated datasets in the GlaS, MoNuSeg and CoNSeP layouts (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

STROMA = (225, 170, 200)  # pink
EPITHELIUM = (120, 70, 150)  # purple
LUMEN = (245, 245, 245)
NUCLEUS = (60, 30, 110)


def gland_image(size: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like image with two ring-shaped glands around white lumina, and its instance mask."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = STROMA
    mask = np.zeros((size, size), np.uint8)
    for label, (cy, cx, r) in enumerate([(90, 90, 60), (210, 200, 70)], start=1):
        d = np.hypot(y - cy, x - cx)
        mask[d < r] = label
        image[d < r] = EPITHELIUM
        image[d < r * 0.45] = LUMEN
    noise = rng.integers(-8, 9, size=image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), mask


def nuclei_image(size: int = 300, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dark round nuclei on pink, and their outlines as (N, 2) x/y arrays."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = STROMA
    outlines = []
    y, x = np.mgrid[:size, :size]
    for cy in range(20, size - 10, 30):
        for cx in range(20, size - 10, 30):
            cy_, cx_ = cy + rng.integers(-4, 5), cx + rng.integers(-4, 5)
            r = rng.uniform(7, 10)
            image[np.hypot(y - cy_, x - cx_) < r] = NUCLEUS
            t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            outlines.append(np.stack([cx_ + r * np.cos(t), cy_ + r * np.sin(t)], axis=1))
    return image, outlines


def write_glas(root: Path, count: int = 5) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for i in range(1, count + 1):
        image, mask = gland_image(seed=i)
        Image.fromarray(image).save(root / "images" / f"train_{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"train_{i}.png")
        grade = "benign" if i % 2 else "malignant"
        rows.append(f"train_{i},{i}, {grade}, adenomatous")
    (root / "Grade.csv").write_text("\n".join(rows) + "\n")
    return root


def write_monuseg(root: Path, names: tuple[str, ...] = ("tile-a", "tile-b")) -> Path:
    root.mkdir(parents=True)
    for seed, name in enumerate(names):
        image, outlines = nuclei_image(seed=seed)
        Image.fromarray(image).save(root / f"{name}.tif")
        regions = "".join(
            f'<Region Id="{i}"><Vertices>'
            + "".join(f'<Vertex X="{px:.2f}" Y="{py:.2f}" Z="0"/>' for px, py in outline)
            + "</Vertices></Region>"
            for i, outline in enumerate(outlines, start=1)
        )
        (root / f"{name}.xml").write_text(
            f'<Annotations MicronsPerPixel="0.500000"><Annotation><Regions>{regions}'
            "</Regions></Annotation></Annotations>"
        )
    return root


def write_consep(root: Path, images: int = 5, patches: int = 4, size: int = 256) -> Path:
    """CoNSeP's layout: `images/train_N_KKK.png`, `inst/` 16-bit instance maps, `types/` .mat
    files with one class (1-4) per instance in the order of the sorted ids."""
    from scipy.io import savemat

    from inference.datasets import rasterise

    for sub in ("images", "inst", "types"):
        (root / sub).mkdir(parents=True)
    for n in range(1, images + 1):
        for k in range(patches):
            image, outlines = nuclei_image(size=size, seed=100 * n + k)
            # 40x: nuclei twice the size of the 0.5 µm/px generator's
            big = np.kron(image[: size // 2, : size // 2], np.ones((2, 2, 1), np.uint8))
            instances = rasterise([o * 2 for o in outlines], (size, size), 1.0)
            ids = np.unique(instances)[1:]
            classes = 1 + ids % 4
            name = f"train_{n}_{k:03d}"
            Image.fromarray(big).save(root / "images" / f"{name}.png")
            Image.fromarray(instances.astype(np.uint16)).save(root / "inst" / f"{name}.png")
            savemat(root / "types" / f"{name}.mat", {"inst_type": classes.reshape(-1, 1)})
    return root


def write_all(root: Path) -> Path:
    write_glas(root / "glas")
    write_monuseg(root / "monuseg")
    write_consep(root / "consep")
    return root
