"""Text-to-patch ranking (the KoCLIP demo's "which part of the picture is it?") and its heat map.

Two ways to score the cells of a rows x cols grid laid over the image against one text:

- "crops" (the demo's way): each cell is cut out of the original picture and embedded as an
  image of its own (the usual preprocessing: shortest side resized, centre crop). A cell's score
  is the cosine between the text and that crop's embedding. One image forward pass per cell.
- "tokens" (dense): the whole picture is resized to the model's S x S input (no crop, so every
  token maps back to a known rectangle of the picture, aspect ratio squeezed) and passed once
  through the vision tower; `encode_patches` gives one embedding per patch token (the class
  token excluded), projected into the shared space. A cell's embedding is the average of the
  token embeddings weighted by the area each token's rectangle shares with the cell, then
  L2-normalised; its score is the cosine with the text. Per-token cosines are kept too
  (`token_scores`, [g, g]). One forward pass whatever the grid.

The model is anything with `open(source) -> PIL RGB image`, `embed_images(list) -> [N, D]`,
`embed_texts(list) -> [N, D]` (both L2-normalised), `embed_patches(pixels) -> [B, P, D]` and a
`config` with image settings: koclip.query.QueryModel. Use `koclip.query.rank_patches`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from koclip.errors import PatchError

MODES = ("crops", "tokens")

Box = tuple[int, int, int, int]


def parse_grid(grid: int | str | Sequence[int]) -> tuple[int, int]:
    """(rows, cols) from 3, "3x4" or (3, 4); PatchError when not two positive integers."""
    if isinstance(grid, str):
        parts = grid.lower().split("x")
        try:
            grid = tuple(int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
        except ValueError:
            raise PatchError(f"grid must look like 3 or 3x4 (rows x cols), got {grid!r}") from None
    elif isinstance(grid, (int, np.integer)):
        grid = (int(grid), int(grid))
    grid = tuple(grid)
    if len(grid) != 2 or not all(isinstance(g, (int, np.integer)) and g >= 1 for g in grid):
        raise PatchError(f"grid must be two positive integers (rows, cols), got {grid!r}")
    return int(grid[0]), int(grid[1])


def cell_boxes(width: int, height: int, rows: int, cols: int) -> list[Box]:
    """Row-major (x0, y0, x1, y1) pixel boxes, x1/y1 exclusive, that tile the image exactly."""
    if rows > height or cols > width:
        raise PatchError(f"a {rows}x{cols} grid does not fit a {width}x{height} image "
                         "(each cell needs at least one pixel)")
    xs = [round(c * width / cols) for c in range(cols + 1)]
    ys = [round(r * height / rows) for r in range(rows + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]


def overlap_weights(boxes: Sequence[Box], width: int, height: int, tokens_per_side: int) -> np.ndarray:
    """[cells, g*g]: the fraction of each cell's area covered by each token of a g x g token grid
    stretched over the whole image (tokens row-major, as encode_patches orders them)."""
    g = tokens_per_side
    edges = np.arange(g + 1) / g
    weights = np.zeros((len(boxes), g * g))
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        fx = np.clip(np.minimum(edges[1:], x1 / width) - np.maximum(edges[:-1], x0 / width), 0, None)
        fy = np.clip(np.minimum(edges[1:], y1 / height) - np.maximum(edges[:-1], y0 / height), 0, None)
        area = np.outer(fy, fx).reshape(-1)
        weights[i] = area / area.sum()
    return weights


@dataclass
class PatchRanking:
    """Scores of a grid of cells against one text. Cells are row-major; rank 1 is the best."""

    text: str
    mode: str
    grid: tuple[int, int]
    image: Image.Image  # the decoded picture, RGB, original size
    boxes: list[Box]  # (x0, y0, x1, y1) in picture pixels, x1/y1 exclusive
    scores: np.ndarray  # float32 [cells], cosine similarity with the text
    token_scores: np.ndarray | None = None  # float32 [g, g] per-token cosines ("tokens" mode)

    @property
    def order(self) -> np.ndarray:
        """Cell indices, best first (ties keep row-major order)."""
        return np.argsort(-self.scores, kind="stable")

    @property
    def ranks(self) -> np.ndarray:
        """int [cells]: each cell's 1-based rank."""
        ranks = np.empty(len(self.scores), dtype=np.int64)
        ranks[self.order] = np.arange(1, len(self.scores) + 1)
        return ranks

    @property
    def score_grid(self) -> np.ndarray:
        """float32 [rows, cols]."""
        return self.scores.reshape(self.grid)

    def cells(self) -> list[dict]:
        """One dict per cell, best first: rank, score, row, col, box."""
        cols = self.grid[1]
        return [{"rank": rank, "score": float(self.scores[i]), "row": int(i) // cols, "col": int(i) % cols,
                 "box": list(self.boxes[i])} for rank, i in enumerate(self.order, start=1)]

    def overlay(self, alpha: float = 0.45, cmap: str = "jet", labels: bool = True) -> Image.Image:
        """The picture with the cell scores blended over it as a heat map (min-max scaled, so the
        best cell is the hottest), a line around each cell and its rank in the corner."""
        import matplotlib

        colormap = matplotlib.colormaps[cmap]
        low, high = float(self.scores.min()), float(self.scores.max())
        scaled = (self.scores - low) / (high - low) if high > low else np.full_like(self.scores, 0.5)
        heat = Image.new("RGB", self.image.size)
        draw = ImageDraw.Draw(heat)
        for box, value in zip(self.boxes, scaled):
            colour = tuple(int(round(255 * c)) for c in colormap(float(value))[:3])
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
        out = Image.blend(self.image.convert("RGB"), heat, alpha)
        draw = ImageDraw.Draw(out)
        for box, rank in zip(self.boxes, self.ranks):
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
            if labels:
                draw.text((box[0] + 2, box[1] + 1), str(rank), fill=(255, 255, 255), stroke_width=1,
                          stroke_fill=(0, 0, 0))
        return out

    def save_overlay(self, path: str, **overlay_options) -> str:
        """Write overlay() as PNG (a local path or any fsspec URL); returns the path."""
        import io

        from koclip import fs

        buffer = io.BytesIO()
        self.overlay(**overlay_options).save(buffer, format="PNG")
        fs.write_bytes(str(path), buffer.getvalue())
        return str(path)


def rank_patches_with(model, text: str, image, grid=(3, 3), mode: str = "crops") -> PatchRanking:
    """rank_patches on an already-loaded model (see the module docstring for the two modes)."""
    if mode not in MODES:
        raise PatchError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(text, str) or not text.strip():
        raise PatchError("the text to rank patches against is empty")
    rows, cols = parse_grid(grid)
    picture = model.open(image)
    width, height = picture.size
    boxes = cell_boxes(width, height, rows, cols)
    text_emb = model.embed_texts([text])[0]
    if mode == "crops":
        crops = model.embed_images([picture.crop(box) for box in boxes])
        return PatchRanking(text, mode, (rows, cols), picture, boxes, (crops @ text_emb).astype(np.float32))

    tokens = token_embeddings(model, picture)  # [g*g, D]
    g = math.isqrt(tokens.shape[0])
    cells = overlap_weights(boxes, width, height, g) @ tokens.astype(np.float64)
    cells /= np.maximum(np.linalg.norm(cells, axis=1, keepdims=True), 1e-12)
    scores = (cells @ text_emb.astype(np.float64)).astype(np.float32)
    token_scores = (tokens @ text_emb).reshape(g, g).astype(np.float32)
    return PatchRanking(text, mode, (rows, cols), picture, boxes, scores, token_scores)


def token_embeddings(model, picture: Image.Image) -> np.ndarray:
    """[g*g, D] patch-token embeddings of the whole picture squeezed to the model's input size."""
    from koclip.processing import preprocess_image

    config = model.config
    size = config.image_size
    squeezed = picture.resize((size, size), resample=Image.Resampling[config.image_resample.upper()])
    pixels = preprocess_image(squeezed, size, config.image_mean, config.image_std, size, "square",
                              config.image_resample)
    tokens = np.asarray(model.embed_patches(pixels[None]))[0]
    g = math.isqrt(tokens.shape[0])
    if g * g != tokens.shape[0]:
        raise ValueError(f"the vision tower returned {tokens.shape[0]} patch tokens, not a square grid")
    return tokens
