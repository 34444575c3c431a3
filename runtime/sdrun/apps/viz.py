"""Pictures of a result: both images side by side, kept boxes coloured by status,
the change heatmap blended in."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..files import atomic_write
from ..stages.images import as_rgb, load_image

if TYPE_CHECKING:
    from ..pipeline import PairResult

COLOURS = {  # RGB
    "added": (40, 200, 60),
    "removed": (230, 40, 40),
    "changed": (250, 210, 30),
    "matched": (150, 150, 150),
}
HEAT_ALPHA = 0.35


def render_pair(a: np.ndarray, b: np.ndarray, result: PairResult, heat_alpha: float = HEAT_ALPHA) -> np.ndarray:
    """RGB uint8 picture: image 1 | image 2, heatmap overlaid, boxes and labels drawn."""
    panels = []
    for image_no, img in ((1, as_rgb(a)), (2, as_rgb(b))):
        panel = img.copy()
        if result.heatmaps is not None:
            heat = np.clip(result.heatmaps[image_no - 1], 0, 1)
            coloured = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
            panel = cv2.addWeighted(panel, 1 - heat_alpha, coloured, heat_alpha, 0)
        scale = max(1, round(max(panel.shape[:2]) / 400))
        for obj in result.objects:
            if obj["image"] != image_no:
                continue
            x1, y1, x2, y2 = (int(round(v)) for v in obj["box"])
            colour = COLOURS[obj["status"]]
            cv2.rectangle(panel, (x1, y1), (x2, y2), colour, scale)
            text = f"{obj['label']} {obj['fused_score']:.2f}"
            cv2.putText(panel, text, (x1 + 2, max(10, y1 + 10 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.3 * scale, colour, 1, cv2.LINE_AA)
        panels.append(panel)
    h = max(p.shape[0] for p in panels)
    gap = np.full((h, 6, 3), 255, np.uint8)
    padded = [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    canvas = np.concatenate([padded[0], gap, padded[1]], axis=1)
    caption = (f"added: {' '.join(result.added) or 'none'} | removed: {' '.join(result.removed) or 'none'}"
               f" | changed: {' '.join(result.changed) or 'none'} | change {result.change_score:.2f}")
    lines = wrap_text(caption, canvas.shape[1] - 8)
    bar = np.full((8 + 14 * len(lines), canvas.shape[1], 3), 255, np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(bar, line, (4, 15 + 14 * k), FONT, FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([canvas, bar], axis=0)


FONT, FONT_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.4


def text_width(text: str) -> int:
    return cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0]


def wrap_text(text: str, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (broken at spaces; a single word wider
    than that is cut)."""
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if text_width(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
        while text_width(line) > width and len(line) > 1:  # one word wider than the picture
            cut = len(line)
            while cut > 1 and text_width(line[:cut]) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    return lines + ([line] if line else [])


def write_picture(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB picture whole (`atomic_write`; its folder made if missing), in the
    format of the file's extension (as cv2.imwrite)."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise OSError(f"{path}: the picture could not be encoded as {path.suffix or '(no extension)'}")
    atomic_write(path, encoded.tobytes())
    return path


def save_pair_viz(path: str | Path, a: str | Path | np.ndarray, b: str | Path | np.ndarray,
                  result: PairResult) -> Path:
    a = load_image(a) if isinstance(a, (str, Path)) else a
    b = load_image(b) if isinstance(b, (str, Path)) else b
    return write_picture(path, render_pair(a, b, result))
