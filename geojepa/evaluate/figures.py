"""Pictures of an evaluation: kNN galleries (PNG + HTML), the embedding map, the region in PCA colours,
training curves. Matplotlib without a display."""

from __future__ import annotations

import html
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import shapely  # noqa: E402

from geojepa.encoding.classes import CLASSES  # noqa: E402

log = logging.getLogger(__name__)
COLOURS = {c: plt.get_cmap("tab20")(i) for i, c in enumerate((*CLASSES, "other"))}


def draw_tile(ax, geometries: list[bytes], classes: list[str], image: np.ndarray | None = None,
              highlight: int | None = None) -> None:
    """A tile as a small map: its image (north up) under its entities, coloured by tag class; with
    ``highlight``, that entity in colour and the others grey."""
    if image is not None:
        ax.imshow(image[..., :3], extent=(0, 1, 0, 1), origin="upper", alpha=0.55)
    for j, (g, c) in enumerate(zip(shapely.from_wkb(geometries), classes, strict=True)):
        colour = COLOURS[c] if highlight is None or j == highlight else (0.75, 0.75, 0.75, 1)
        z, lw = (3, 1.6) if j == highlight else (2, 0.8)
        for part in getattr(g, "geoms", [g]):
            if part.geom_type == "Polygon":
                x, y = part.exterior.xy
                ax.fill(x, y, color=colour, alpha=0.6, lw=0.3, zorder=z)
            elif part.geom_type == "LineString":
                ax.plot(*part.xy, color=colour, lw=lw, zorder=z)
            elif part.geom_type == "Point":
                ax.plot(part.x, part.y, "o", color=colour, ms=2.5 if j != highlight else 5, zorder=z)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")


def gallery(png: Path, page: Path, title: str, rows: list[list[tuple[str, float, dict]]]) -> None:
    """One row per query: the query, then its neighbours. Each cell: (label, similarity, draw_tile kwargs)."""
    cols = max(len(r) for r in rows)
    legend = 0.55  # inches below the panels for the legend
    height = 2.3 * len(rows) + legend
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.1 * cols, height), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            label, sim, kwargs = row[c]
            draw_tile(ax, **kwargs)
            ax.set_title(("query\n" if c == 0 else f"#{c}  cos {sim:.3f}\n") + label, fontsize=6)
    handles = [plt.Line2D([], [], color=COLOURS[c], lw=4) for c in COLOURS]
    fig.legend(handles, list(COLOURS), loc="lower center", ncol=min(9, 4 * cols), fontsize=6, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, legend / height, 1, 1 - 0.25 / height))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    body = "".join(
        "<tr>" + "".join(f"<td>{'query' if c == 0 else f'#{c} ({s:.3f})'}<br><code>{html.escape(label)}</code></td>"
                         for c, (label, s, _) in enumerate(row)) + "</tr>" for row in rows)
    page.write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<h1>{html.escape(title)}</h1><img src='{png.name}' style='max-width:100%'>"
                    f"<table border=1 cellpadding=4 style='border-collapse:collapse;font-size:12px'>{body}</table>")


def embedding_map(emb: np.ndarray, colour: np.ndarray, label: str, path: Path, method: str, seed: int) -> str:
    """2-D map of the embeddings (UMAP, or PCA for few points or when asked), coloured by ``colour``."""
    if method == "umap" and len(emb) >= 10:
        import warnings

        import umap

        from geojepa.encoding.neighbours import topk_cosine

        # The exact cosine neighbours (self first), computed in torch: below 4,096 points UMAP would compute
        # them with a Python-level metric call per pair (16 M calls for 4,000 tiles).
        k = min(15, len(emb) - 1)
        sims, idx = topk_cosine(emb, emb, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state"; "precomputed_knn ..."
            xy = umap.UMAP(n_neighbors=k, metric="cosine", random_state=seed, n_jobs=1,
                           precomputed_knn=(idx, np.maximum(1 - sims, 0).astype(np.float32), None)).fit_transform(emb)
    else:
        method = "pca"
        xy = pca(emb, 2)
    fig, ax = plt.subplots(figsize=(5, 4.3))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=colour, s=12, cmap="viridis")
    fig.colorbar(sc, ax=ax, label=label)
    ax.set_title(f"tile embeddings ({method.upper()}), coloured by {label}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return method


def pca(x: np.ndarray, n: int) -> np.ndarray:
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    out = u[:, :n] * s[:n]
    return np.pad(out, ((0, 0), (0, n - out.shape[1])))


def pc_colours(emb: np.ndarray) -> np.ndarray:
    """(n, 3) RGB in [0, 1] from the first three principal components, each stretched between its 2nd and 98th
    percentile (a few extreme tiles would otherwise squeeze every other one into a pale middle)."""
    pcs = pca(emb, 3)
    lo, hi = np.percentile(pcs, 2, axis=0), np.percentile(pcs, 98, axis=0)
    return np.clip((pcs - lo) / np.where(hi > lo, hi - lo, 1), 0, 1)


def bulk_extent(x: np.ndarray, y: np.ndarray, pad: float, share: float = 0.98) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) framing the bulk of the points (tile centres): on each axis the central ``share`` of
    them, widened by ``pad`` (a tile's size, so edge tiles show whole) and 5% of the span. A few stray tiles
    tens of kilometres away (an entity far off the town) no longer set the view; all of them when few."""
    if len(x) < 50:
        share = 1.0
    q = (1 - share) / 2
    (x0, x1), (y0, y1) = np.quantile(x, [q, 1 - q]), np.quantile(y, [q, 1 - q])
    mx, my = pad + 0.05 * (x1 - x0), pad + 0.05 * (y1 - y0)
    return float(x0 - mx), float(y0 - my), float(x1 + mx), float(y1 + my)


def region_map(footprints, emb: np.ndarray, path: Path, title: str) -> int:
    """The region's tiles (WKB footprints) filled with the RGB of their embedding's first three principal
    components (``pc_colours``), drawn as one collection, framed on the bulk of the tiles (``bulk_extent``);
    how many tiles lie outside the frame is written under it and returned."""
    from matplotlib.collections import PolyCollection

    geoms = shapely.from_wkb(np.asarray(footprints, dtype=object))
    rings = [np.asarray(g.exterior.coords) for g in geoms]
    centres = shapely.get_coordinates(shapely.centroid(geoms))
    bounds = shapely.bounds(geoms)
    size = float(np.median(bounds[:, 2] - bounds[:, 0])) if len(bounds) else 0.0
    x0, y0, x1, y1 = bulk_extent(centres[:, 0], centres[:, 1], size)
    outside = int(((centres[:, 0] < x0) | (centres[:, 0] > x1) | (centres[:, 1] < y0) | (centres[:, 1] > y1)).sum())
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.add_collection(PolyCollection(rings, facecolors=pc_colours(emb), edgecolors="white", linewidths=0.2))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect(1 / np.cos(np.radians((y0 + y1) / 2)))
    ax.set_xlabel("longitude" + (f"   ({outside} outlying tile{'s' * (outside != 1)} outside this view)"
                                 if outside else ""))
    ax.set_ylabel("latitude")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return outside


def training_curves(history: list[dict], path: Path) -> bool:
    if not history:
        return False
    steps = [h["step"] for h in history]
    keys = [k for k in ("loss", "jepa", "var", "cov", "lr", "std") if k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.4), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        ax.plot(steps, [h[k] for h in history], lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
