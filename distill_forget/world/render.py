"""Procedural rendering of MiniCanvas images: one object (a silhouette) drawn in one style.

Every image is 32x32 RGB. The style's pattern covers the whole canvas (background and
object, in different colours), so the style stays visible even on thin shapes. Position,
size, colours and pattern phase are jittered; everything depends only on the seed.
"""

import colorsys

import numpy as np

from distill_forget.world.concepts import OBJECTS, STYLES

IMAGE_SIZE = 32
_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: soft, stable edges


def _shape_mask(obj: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `obj` in coordinates centred on the object and scaled by its radius."""
    d = np.sqrt(u * u + v * v)
    box = np.maximum(np.abs(u), np.abs(v))
    if obj == "circle":
        return d < 0.95
    if obj == "ring":
        return (d < 0.95) & (d > 0.6)
    if obj == "square":
        return box < 0.8
    if obj == "hollow square":
        return (box < 0.85) & (box > 0.5)
    if obj == "diamond":
        return np.abs(u) + np.abs(v) < 1.05
    if obj == "triangle":
        return (v < 0.75) & (v > -0.95 + 1.9 * np.abs(u))
    if obj == "cross":
        return (np.minimum(np.abs(u - v), np.abs(u + v)) < 0.3) & (box < 0.85)
    if obj == "plus sign":
        return (np.minimum(np.abs(u), np.abs(v)) < 0.22) & (box < 0.95)
    if obj == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        sector = 2 * np.pi / 5
        tip = np.abs(np.mod(theta, sector) - sector / 2) / (sector / 2)  # 1 between tips, 0 at tips
        return d < 1.0 - 0.58 * tip
    if obj == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y**3 < 0
    if obj == "crescent":
        return (d < 0.95) & (np.sqrt((u - 0.45) ** 2 + (v + 0.15) ** 2) > 0.75)
    if obj == "arrow":
        shaft = (np.abs(v) < 0.2) & (u > -0.95) & (u < 0.1)
        head = (u >= 0.0) & (u < 0.95) & (np.abs(v) < 0.95 * (0.95 - u))
        return shaft | head
    raise KeyError(f"unknown object {obj!r}")


def _hsv(rng: np.random.Generator, h: float, s: float, v: float, jitter: float = 1.0) -> np.ndarray:
    h = (h + rng.uniform(-12, 12) * jitter) / 360.0 % 1.0
    s = float(np.clip(s + rng.uniform(-0.08, 0.08) * jitter, 0, 1))
    v = float(np.clip(v + rng.uniform(-0.06, 0.06) * jitter, 0, 1))
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    eroded = mask.copy()
    for _ in range(width):
        shrunk = eroded.copy()
        shrunk[1:, :] &= eroded[:-1, :]
        shrunk[:-1, :] &= eroded[1:, :]
        shrunk[:, 1:] &= eroded[:, :-1]
        shrunk[:, :-1] &= eroded[:, 1:]
        eroded = shrunk
    return mask & ~eroded


def _mix(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    return a[None, None, :] * (1 - p[..., None]) + b[None, None, :] * p[..., None]


def render(obj: str, style: str, rng: np.random.Generator) -> np.ndarray:
    """One image of `obj` in `style` as uint8 (32, 32, 3)."""
    if obj not in OBJECTS:
        raise KeyError(f"unknown object {obj!r}; known: {OBJECTS}")
    if style not in STYLES:
        raise KeyError(f"unknown style {style!r}; known: {STYLES}")
    n = IMAGE_SIZE * _SUPERSAMPLE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / _SUPERSAMPLE  # pixel units of the 32px image
    radius = rng.uniform(9.0, 12.5)
    cx, cy = 16 + rng.uniform(-3, 3), 16 + rng.uniform(-3, 3)
    mask = _shape_mask(obj, (xx - cx) / radius, (yy - cy) / radius)
    phase_x, phase_y = rng.uniform(0, 8, size=2)
    x, y = xx + phase_x, yy + phase_y

    if style in ("stripes", "thin stripes", "diagonal stripes"):
        coord = {"stripes": y, "thin stripes": 2 * y, "diagonal stripes": (x + y) / 1.2}[style]
        p = (np.mod(coord, 8) < 4).astype(np.float64)
        bg = _mix(_hsv(rng, 40, 0.12, 0.97), _hsv(rng, 5, 0.4, 0.95), p)
        fg = _mix(_hsv(rng, 5, 0.9, 0.8), _hsv(rng, 5, 0.9, 0.35), p)
    elif style in ("dots", "big dots"):
        r = 1.4 if style == "dots" else 2.9
        p = ((np.mod(x, 8) - 4) ** 2 + (np.mod(y, 8) - 4) ** 2 < r * r).astype(np.float64)
        bg = _mix(_hsv(rng, 215, 0.08, 0.98), _hsv(rng, 215, 0.45, 0.85), p)
        fg = _mix(_hsv(rng, 215, 0.85, 0.45), _hsv(rng, 200, 0.55, 0.75), p)
    elif style == "flat color":
        hue = rng.uniform(0, 360)
        p = np.zeros_like(x)
        bg = _mix(_hsv(rng, 0, 0.0, 0.8), _hsv(rng, 0, 0.0, 0.8), p)
        fg = _mix(_hsv(rng, hue, 0.9, 0.75, 0), _hsv(rng, hue, 0.9, 0.75, 0), p)
    elif style == "pastel color":
        hue = rng.uniform(0, 360)
        p = np.zeros_like(x)
        bg = _mix(_hsv(rng, 0, 0.0, 1.0, 0), _hsv(rng, 0, 0.0, 1.0, 0), p)
        fg = _mix(_hsv(rng, hue, 0.45, 0.9, 0), _hsv(rng, hue, 0.45, 0.9, 0), p)
    elif style == "checkerboard":
        p = ((np.floor(x / 8) + np.floor(y / 8)) % 2).astype(np.float64)
        bg = _mix(_hsv(rng, 130, 0.1, 0.97), _hsv(rng, 130, 0.35, 0.8), p)
        fg = _mix(_hsv(rng, 130, 0.85, 0.5), _hsv(rng, 130, 0.6, 0.15), p)
    elif style == "gradient":
        t = np.clip(yy / IMAGE_SIZE + rng.uniform(-0.1, 0.1), 0, 1)
        bg = _mix(_hsv(rng, 275, 0.55, 0.9), _hsv(rng, 35, 0.65, 1.0), t)
        fg = np.broadcast_to(_hsv(rng, 250, 0.6, 0.25), bg.shape)
    elif style in ("sketch", "neon"):
        line = _outline(mask, 3)
        if style == "sketch":
            paper, ink = _hsv(rng, 45, 0.08, 0.97), _hsv(rng, 0, 0.0, 0.15)
        else:
            paper, ink = _hsv(rng, 240, 0.3, 0.08), _hsv(rng, rng.choice([180.0, 300.0]), 0.9, 1.0)
        bg = np.broadcast_to(paper, (n, n, 3))
        fg = np.broadcast_to(ink, (n, n, 3))
        mask = line
    elif style == "mosaic":
        cells = IMAGE_SIZE // 4 + 2
        block = lambda a: np.floor(a / 4).astype(int)  # noqa: E731 - 4px blocks
        by, bx = block(y), block(x)
        hues_bg = rng.uniform(30, 60, size=(cells, cells))
        vals_bg = rng.uniform(0.75, 1.0, size=(cells, cells))
        hues_fg = rng.uniform(10, 35, size=(cells, cells))
        vals_fg = rng.uniform(0.3, 0.5, size=(cells, cells))
        bg = _blocks(hues_bg, 0.45, vals_bg)[by, bx]
        fg = _blocks(hues_fg, 0.85, vals_fg)[by, bx]
    else:  # pragma: no cover - guarded above
        raise KeyError(style)

    image = np.where(mask[..., None], fg, bg)
    image = image.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _blocks(hues: np.ndarray, sat: float, vals: np.ndarray) -> np.ndarray:
    rgb = [colorsys.hsv_to_rgb(h / 360.0, sat, v) for h, v in zip(hues.ravel(), vals.ravel())]
    return np.array(rgb).reshape(*hues.shape, 3)


def render_batch(pairs: list[tuple[str, str]], seed: int) -> np.ndarray:
    """Images for (object, style) pairs as uint8 (N, 32, 32, 3); image i depends only on (seed, i)."""
    out = np.empty((len(pairs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (obj, style) in enumerate(pairs):
        out[i] = render(obj, style, np.random.default_rng([seed, i]))
    return out


def grid_pairs(repeats: int = 1) -> list[tuple[str, str]]:
    """Every (object, style) pair, `repeats` times, in a fixed order."""
    return [(o, s) for _ in range(repeats) for o in OBJECTS for s in STYLES]
