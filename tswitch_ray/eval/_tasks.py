"""Deterministic image-classification tasks for the offline demo zoo.

Eight small tasks that mirror the spirit of the 8-task ViT-B/32 suite used by
papers 000/002/003 (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD),
built only from data that ships inside installed packages or from seeded
generators, because no dataset download works here:

==================  ======  ================================================  =================
task                kind    source                                            train/eval split
==================  ======  ================================================  =================
digits              real    scikit-learn ``load_digits`` 8x8 scans            by scan index (i % 5 == 0 is eval)
cluttered_digits    real    the same scans pasted on scikit-image textures    by scan index, as digits
glyphs              real    letters A-J, matplotlib's fonts, dark on light    by font file (held-out fonts)
textures            real    scikit-image textures (brick, grass, ...)         by crop region (top 70 % / bottom 30 %)
scenes              real    scikit-image photos (astronaut, coffee, ...)      by crop region (left 65 % / right 35 %)
signs               gen.    traffic-sign-like shapes and colours              by seed
satellite           gen.    synthetic land-use patterns                       by seed
svhn_like           gen.    light font digits on darker coloured plates       by seed
==================  ======  ================================================  =================

The base tower's generic pretraining set (:func:`generate_pretrain`: letters
K-Z/lowercase and signs in matplotlib's training fonts; no digit, none of A-J)
lives here too.

Every generator is a pure function of ``(split, n, seed, image_size)``: the
same arguments give the same bytes. Labels are balanced (``i % n_classes``,
then shuffled).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from tswitch_ray.errors import ConfigError

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class TaskInfo:
    """One demo task: its class names, whether its pixels come from real data, and where from."""

    name: str
    classes: tuple[str, ...]
    real: bool
    source: str
    split_rule: str


Generator = Callable[[str, int, np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- helpers


def _balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


def _to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return a[..., :3]


def _add_noise(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    out = img.astype(np.float32) + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _contrasting_colours(rng: np.random.Generator, min_diff: float = 90.0, polarity: str = "any") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground/background pair whose luminances differ by at least ``min_diff``.

    ``polarity`` "dark_on_light" (print: ink darker than paper) or
    "light_on_dark" (house-number plates) fixes which of the two is brighter;
    a tower this small learns a fixed polarity from ~1.5k images, while random
    polarity left glyphs and svhn_like at chance (measured, demo recipe v2).
    """
    lum = lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]  # noqa: E731
    sign = {"any": 0, "dark_on_light": 1, "light_on_dark": -1}[polarity]
    while True:
        fg = rng.integers(0, 256, 3)
        bg = rng.integers(0, 256, 3)
        diff = lum(bg) - lum(fg)
        if (sign * diff if sign else abs(diff)) >= min_diff:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _random_crop(src: Image.Image, region: tuple[int, int, int, int], side: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Crop a ``side`` x ``side`` square inside ``region`` (x0, y0, x1, y1) and resize it to ``size``."""
    x0, y0, x1, y1 = region
    side = min(side, x1 - x0, y1 - y0)
    cx = int(rng.integers(x0, x1 - side + 1))
    cy = int(rng.integers(y0, y1 - side + 1))
    patch = src.resize((size, size), Image.BILINEAR, box=(cx, cy, cx + side, cy + side))
    return np.asarray(patch)


def _font_paths() -> list[str]:
    import matplotlib

    paths = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")))
    # Symbol-only fonts (STIX size variants, cmex/cmsy, LastResort) have no Latin letters.
    bad = ("STIXSiz", "STIXNonUni", "cmex", "cmsy", "LastResort", "Display")
    return [p for p in paths if not any(b in os.path.basename(p) for b in bad)]


# Fonts never used to render training glyphs: glyphs' eval split is by font file.
_HELD_OUT_FONTS = (
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "STIXGeneralBolIta.ttf",
    "cmti10.ttf",
)


class _Fonts:
    """Lazily opened TrueType fonts keyed by (path, pixel size), local to one generator call."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}

    def get(self, path: str, size: int) -> ImageFont.FreeTypeFont:
        key = (path, size)
        if key not in self._cache:
            self._cache[key] = ImageFont.truetype(path, size)
        return self._cache[key]


def _render_text(text: str, font: ImageFont.FreeTypeFont, canvas: int, fg, bg, center: tuple[float, float], angle: float) -> Image.Image:
    img = Image.new("RGB", (canvas, canvas), bg)
    ImageDraw.Draw(img).text(center, text, font=font, fill=fg, anchor="mm")
    if angle:
        img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=bg)
    return img


# ---------------------------------------------------------------- digits


def _digit_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(len(d.target))
    keep = (idx % 5 == 0) if split == "eval" else (idx % 5 != 0)
    imgs = (d.images[keep] / 16.0 * 255.0).astype(np.uint8)
    return imgs, d.target[keep].astype(np.int64)


def _pick_per_label(labels: np.ndarray, pool_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    by_class = {c: np.flatnonzero(pool_labels == c) for c in np.unique(pool_labels)}
    return np.array([by_class[int(y)][rng.integers(len(by_class[int(y)]))] for y in labels])


def _gen_digits(split: str, n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    scans, targets = _digit_split(split)
    labels = _balanced_labels(n, 10, rng)
    picks = _pick_per_label(labels, targets, rng)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, j in enumerate(picks):
        s = int(rng.integers(int(0.6 * size), int(0.9 * size) + 1))
        glyph = Image.fromarray(scans[j]).resize((s, s), Image.BICUBIC)
        glyph = glyph.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
        canvas = Image.new("L", (size, size), int(rng.integers(0, 40)))
        ox, oy = (int(rng.integers(0, size - s + 1)) for _ in range(2))
        canvas.paste(glyph, (ox, oy), mask=glyph)
        out[i] = _to_rgb(_add_noise(np.asarray(canvas), rng, 8.0))
    return out, labels


def _texture_sources() -> dict[str, np.ndarray]:
    import skimage.color
    import skimage.data as skd

    ihc = (skimage.color.rgb2gray(skd.immunohistochemistry()) * 255).astype(np.uint8)
    return {
        "brick": skd.brick(),
        "grass": skd.grass(),
        "gravel": skd.gravel(),
        "moon": skd.moon(),
        "cell": skd.cell(),
        "ihc": ihc,
        "coins": skd.coins(),
    }


def _gen_cluttered_digits(split: str, n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    scans, targets = _digit_split(split)
    backgrounds = [Image.fromarray(a) for a in _texture_sources().values()]
    labels = _balanced_labels(n, 10, rng)
    picks = _pick_per_label(labels, targets, rng)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, j in enumerate(picks):
        bg_img = backgrounds[int(rng.integers(len(backgrounds)))]
        w, h = bg_img.size
        # Backgrounds come from the textures task's training rows only, so no eval pixel leaks anywhere.
        bg = _random_crop(bg_img, (0, 0, w, int(0.7 * h)), int(rng.integers(48, 160)), size, rng).astype(np.float32)
        bg = bg * rng.uniform(0.35, 0.7)
        canvas = Image.fromarray(bg.astype(np.uint8))
        # Two fragments of other digits as clutter, then the labelled digit on top.
        for _ in range(2):
            k = int(rng.integers(len(scans)))
            frag = Image.fromarray(scans[k][: int(rng.integers(3, 6)), :]).resize((size // 3, size // 4), Image.BICUBIC)
            canvas.paste(frag, (int(rng.integers(0, size - size // 3)), int(rng.integers(0, size - size // 4))), mask=frag)
        s = int(rng.integers(int(0.55 * size), int(0.75 * size) + 1))
        glyph = Image.fromarray(scans[j]).resize((s, s), Image.BICUBIC)
        glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        canvas.paste(glyph, (int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))), mask=glyph)
        out[i] = _to_rgb(_add_noise(np.asarray(canvas), rng, 14.0))
    return out, labels


# ---------------------------------------------------------------- glyphs


GLYPH_CLASSES = tuple("ABCDEFGHIJ")


def _gen_glyphs(split: str, n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    fonts = _font_paths()
    held = [p for p in fonts if os.path.basename(p) in _HELD_OUT_FONTS]
    pool = held if split == "eval" else [p for p in fonts if os.path.basename(p) not in _HELD_OUT_FONTS]
    cache = _Fonts()
    labels = _balanced_labels(n, len(GLYPH_CLASSES), rng)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, y in enumerate(labels):
        font = cache.get(pool[int(rng.integers(len(pool)))], int(rng.integers(int(0.7 * size), int(0.9 * size) + 1)))
        fg, bg = _contrasting_colours(rng, 110.0, polarity="dark_on_light")
        c = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
        img = _render_text(GLYPH_CLASSES[int(y)], font, size, fg, bg, (float(c[0]), float(c[1])), float(rng.uniform(-8, 8)))
        out[i] = _add_noise(np.asarray(img), rng, 6.0)
    return out, labels


# ---------------------------------------------------------------- textures and scenes (crop regions)


TEXTURE_CLASSES = ("brick", "grass", "gravel", "moon", "cell", "ihc", "coins")


def _gen_textures(split: str, n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    sources = _texture_sources()
    imgs = [Image.fromarray(sources[c]) for c in TEXTURE_CLASSES]
    labels = _balanced_labels(n, len(TEXTURE_CLASSES), rng)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, y in enumerate(labels):
        src = imgs[int(y)]
        w, h = src.size
        cut = int(0.7 * h)  # rows [0, 70 %) train, [70 %, 100 %) eval: no pixel shared
        region = (0, cut, w, h) if split == "eval" else (0, 0, w, cut)
        side = int(rng.uniform(0.1, 0.25) * min(w, h))
        patch = _random_crop(src, region, side, size, rng)
        patch = np.rot90(patch, int(rng.integers(4)))
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        gain = rng.uniform(0.8, 1.2)
        out[i] = _to_rgb(np.clip(patch.astype(np.float32) * gain, 0, 255).astype(np.uint8))
    return out, labels


SCENE_CLASSES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "hubble", "retina", "camera")


def _scene_sources() -> list[np.ndarray]:
    import skimage.data as skd

    return [
        skd.astronaut(),
        skd.coffee(),
        skd.chelsea(),
        skd.rocket(),
        skd.stereo_motorcycle()[0],
        skd.hubble_deep_field(),
        skd.retina(),
        _to_rgb(skd.camera()),
    ]


def _gen_scenes(split: str, n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    imgs = [Image.fromarray(_to_rgb(a).astype(np.uint8)) for a in _scene_sources()]
    labels = _balanced_labels(n, len(SCENE_CLASSES), rng)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, y in enumerate(labels):
        src = imgs[int(y)]
        w, h = src.size
        cut = int(0.65 * w)  # columns [0, 65 %) train, [65 %, 100 %) eval
        region = (cut, 0, w, h) if split == "eval" else (0, 0, cut, h)
        side = int(rng.uniform(0.2, 0.33) * min(w, h))
        patch = _random_crop(src, region, side, size, rng)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        gain = rng.uniform(0.85, 1.15, 3).astype(np.float32)
        out[i] = np.clip(patch.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return out, labels


# ---------------------------------------------------------------- generated: signs, satellite, svhn_like


SIGN_CLASSES = ("stop", "yield", "warning", "prohibitory", "mandatory", "priority", "information", "end_restriction")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Value noise in [0, 1]: random cells upsampled bilinearly."""
    low = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(low.squeeze() if channels == 1 else low).resize((size, size), Image.BILINEAR)).astype(np.float32) / 255.0


def _polygon(cx: float, cy: float, r: float, k: int, phase: float) -> list[tuple[float, float]]:
    a = phase + np.arange(k) * 2 * np.pi / k
    return [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in a]


def _jitter(c: tuple[int, int, int], rng: np.random.Generator, amount: int = 30) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)


def _gen_signs(split: str, n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    big = size * 3  # draw large, then downsample: anti-aliased edges
    red, blue, yellow, white, black = (200, 30, 30), (30, 60, 190), (235, 200, 30), (240, 240, 240), (20, 20, 20)
    labels = _balanced_labels(n, len(SIGN_CLASSES), rng)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, y in enumerate(labels):
        bg = (_smooth_noise(rng, big, 4) * rng.uniform(80, 200)).astype(np.uint8)
        img = Image.fromarray(bg)
        d = ImageDraw.Draw(img)
        r = big * rng.uniform(0.28, 0.45)
        cx, cy = (big / 2 + rng.uniform(-0.1, 0.1) * big for _ in range(2))
        R, B, Y, W, K = (_jitter(c, rng) for c in (red, blue, yellow, white, black))
        y = int(y)
        if y == 0:  # stop: red octagon, white bar
            d.polygon(_polygon(cx, cy, r, 8, np.pi / 8), fill=R)
            d.rectangle((cx - 0.6 * r, cy - 0.12 * r, cx + 0.6 * r, cy + 0.12 * r), fill=W)
        elif y == 1:  # yield: inverted triangle, red border
            d.polygon(_polygon(cx, cy, r, 3, np.pi / 2), fill=R)
            d.polygon(_polygon(cx, cy, 0.6 * r, 3, np.pi / 2), fill=W)
        elif y == 2:  # warning: upright triangle, red border, black mark
            d.polygon(_polygon(cx, cy, r, 3, -np.pi / 2), fill=R)
            d.polygon(_polygon(cx, cy, 0.6 * r, 3, -np.pi / 2), fill=W)
            d.rectangle((cx - 0.06 * r, cy - 0.3 * r, cx + 0.06 * r, cy + 0.15 * r), fill=K)
        elif y == 3:  # prohibitory: red ring, white inside
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=R)
            d.ellipse((cx - 0.72 * r, cy - 0.72 * r, cx + 0.72 * r, cy + 0.72 * r), fill=W)
        elif y == 4:  # mandatory: blue disc, white arrow
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=B)
            d.polygon([(cx, cy - 0.6 * r), (cx - 0.4 * r, cy), (cx + 0.4 * r, cy)], fill=W)
            d.rectangle((cx - 0.12 * r, cy, cx + 0.12 * r, cy + 0.6 * r), fill=W)
        elif y == 5:  # priority: yellow diamond with white border
            d.polygon(_polygon(cx, cy, r, 4, 0.0), fill=W)
            d.polygon(_polygon(cx, cy, 0.7 * r, 4, 0.0), fill=Y)
        elif y == 6:  # information: blue square, white inner square
            d.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=B)
            d.rectangle((cx - 0.3 * r, cy - 0.45 * r, cx + 0.3 * r, cy + 0.45 * r), fill=W)
        else:  # end of restriction: white disc, black diagonal bar
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=W)
            d.line((cx - 0.65 * r, cy + 0.65 * r, cx + 0.65 * r, cy - 0.65 * r), fill=K, width=max(1, int(0.18 * r)))
        img = img.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
        img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img).astype(np.float32) * rng.uniform(0.6, 1.2)
        out[i] = _add_noise(np.clip(arr, 0, 255).astype(np.uint8), rng, 10.0)
    return out, labels


SATELLITE_CLASSES = ("forest", "sea", "river", "highway", "residential", "industrial", "farmland", "pasture")


def _gen_satellite(split: str, n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(n, len(SATELLITE_CLASSES), rng)
    out = np.empty((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i, y in enumerate(labels):
        y = int(y)
        fine = _smooth_noise(rng, size, size // 2, 1)[..., None]
        coarse = _smooth_noise(rng, size, 4, 1)[..., None]
        land = np.array([90, 120, 60], np.float32) * (0.8 + 0.4 * coarse) + 30 * fine
        if y == 0:  # forest: dark green canopy
            img = np.array([30, 70, 30], np.float32) * (0.7 + 0.6 * fine) + 10 * coarse
        elif y == 1:  # sea: blue with slow waves
            img = np.array([20, 60, 120], np.float32) * (0.85 + 0.3 * coarse) + 12 * fine
        elif y == 2:  # river: land crossed by a sinuous water band
            phase, amp, w = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.25), rng.uniform(0.06, 0.12)
            centre = 0.5 + amp * np.sin(2 * np.pi * xx * rng.uniform(0.7, 1.5) + phase)
            band = (np.abs(yy - centre) < w)[..., None]
            if rng.random() < 0.5:
                band = band.transpose(1, 0, 2)
            img = np.where(band, np.array([30, 70, 130], np.float32) + 10 * fine, land)
        elif y == 3:  # highway: a straight grey band at a random angle
            t = rng.uniform(0, np.pi)
            dist = np.abs((xx - 0.5) * np.sin(t) - (yy - 0.5) * np.cos(t) - rng.uniform(-0.2, 0.2))
            img = np.where((dist < rng.uniform(0.05, 0.09))[..., None], np.array([130, 130, 130], np.float32) + 10 * fine, land)
        elif y == 4:  # residential: a grid of small roofs
            img = np.array([110, 110, 100], np.float32) + 20 * fine
            step = int(rng.integers(5, 8))
            for gy in range(int(rng.integers(0, 3)), size - 3, step):
                for gx in range(int(rng.integers(0, 3)), size - 3, step):
                    img[gy : gy + 3, gx : gx + 3] = rng.choice([[170, 70, 50], [200, 200, 190], [90, 90, 100]])
        elif y == 5:  # industrial: few large bright rectangles on grey
            img = np.array([100, 100, 100], np.float32) + 15 * fine
            for _ in range(int(rng.integers(2, 5))):
                x0, y0 = rng.integers(0, size - 8, 2)
                w, h = rng.integers(6, size // 2, 2)
                img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(170, 230) + 10 * fine[y0 : y0 + h, x0 : x0 + w]
        elif y == 6:  # farmland: parallel field stripes at a random angle
            t = rng.uniform(0, np.pi)
            proj = (xx * np.cos(t) + yy * np.sin(t)) * rng.uniform(3, 6)
            stripe = (np.floor(proj) % 2)[..., None]
            img = np.where(stripe > 0, np.array([160, 150, 70], np.float32), np.array([80, 130, 50], np.float32)) + 15 * fine
        else:  # pasture: light, smooth green
            img = np.array([120, 160, 80], np.float32) * (0.9 + 0.2 * coarse) + 8 * fine
        # Per-channel gain (season, sensor, haze) and sensor noise: colour alone must not give the class away.
        img = img * rng.uniform(0.65, 1.35, 3).astype(np.float32)
        out[i] = _add_noise(np.clip(img, 0, 255).astype(np.uint8), rng, 22.0)
    return out, labels


def _gen_svhn_like(split: str, n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    fonts = [p for p in _font_paths() if "cm" not in os.path.basename(p)]
    cache = _Fonts()
    labels = _balanced_labels(n, 10, rng)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, y in enumerate(labels):
        font = cache.get(fonts[int(rng.integers(len(fonts)))], int(rng.integers(int(0.6 * size), int(0.9 * size) + 1)))
        fg, bg = _contrasting_colours(rng, 100.0, polarity="light_on_dark")
        # Neighbouring house-number digits, cut by the frame, as in SVHN crops.
        text = f"{rng.integers(10)}{int(y)}{rng.integers(10)}"
        c = (size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.1, 0.1) * size)
        img = _render_text(text, font, size, fg, bg, (float(c[0]), float(c[1])), float(rng.uniform(-8, 8)))
        shade = (0.7 + 0.6 * _smooth_noise(rng, size, 3, 1))[..., None]
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.8))))
        out[i] = _add_noise(np.clip(np.asarray(img) * shade, 0, 255).astype(np.uint8), rng, 8.0)
    return out, labels


# ---------------------------------------------------------------- the generic pretraining set


# Symbols for the generic pretraining set: no digit and none of the glyphs task's
# letters A-J, so no task's classes are seen as labels before fine-tuning.
PRETRAIN_SYMBOLS = tuple("KLMNPRSTUVWXYZabdefghkmnpqrtwy#$%&@?+=<>*") 


def generate_pretrain(n: int, seed: int, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The broad generic pretraining set: ``n`` symbols (labels index :data:`PRETRAIN_SYMBOLS`).

    Letters and signs rendered in matplotlib's training fonts (never the
    glyphs task's held-out fonts) with random colours, size, position and
    rotation, on flat or value-noise backgrounds, plus pixel noise: a stand-in
    for the broad web data a CLIP tower is pretrained on. Deterministic in
    ``(n, seed, image_size)``; its rng stream differs from every task's.
    """
    rng = np.random.default_rng([seed, len(TASK_NAMES), 7, image_size])
    size = image_size
    fonts = [p for p in _font_paths() if os.path.basename(p) not in _HELD_OUT_FONTS]
    cache = _Fonts()
    labels = _balanced_labels(n, len(PRETRAIN_SYMBOLS), rng)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, y in enumerate(labels):
        font = cache.get(fonts[int(rng.integers(len(fonts)))], int(rng.integers(int(0.5 * size), int(0.9 * size) + 1)))
        fg, bg = _contrasting_colours(rng, 70.0)
        c = size / 2 + rng.uniform(-0.15, 0.15, 2) * size
        img = np.asarray(_render_text(PRETRAIN_SYMBOLS[int(y)], font, size, fg, bg, (float(c[0]), float(c[1])), float(rng.uniform(-20, 20)))).astype(np.float32)
        if rng.random() < 0.5:
            img = img * (0.6 + 0.8 * _smooth_noise(rng, size, int(rng.integers(2, 6)), 1)[..., None])
        out[i] = _add_noise(np.clip(img, 0, 255).astype(np.uint8), rng, 8.0)
    return out, labels


# ---------------------------------------------------------------- registry


TASKS: dict[str, tuple[TaskInfo, Generator]] = {
    "digits": (
        TaskInfo("digits", tuple(str(i) for i in range(10)), True, "sklearn.datasets.load_digits (1797 real 8x8 scans), upsampled", "scan index % 5 == 0 -> eval"),
        _gen_digits,
    ),
    "cluttered_digits": (
        TaskInfo("cluttered_digits", tuple(str(i) for i in range(10)), True, "load_digits scans pasted on scikit-image texture crops with digit clutter and noise", "scan index % 5 == 0 -> eval"),
        _gen_cluttered_digits,
    ),
    "glyphs": (
        TaskInfo("glyphs", GLYPH_CLASSES, True, "letters A-J rendered dark on light with matplotlib's bundled TrueType fonts", f"eval fonts: {', '.join(_HELD_OUT_FONTS)}"),
        _gen_glyphs,
    ),
    "textures": (
        TaskInfo("textures", TEXTURE_CLASSES, True, "skimage.data textures/micrographs, random crops", "rows [0,70%) train, [70%,100%) eval"),
        _gen_textures,
    ),
    "scenes": (
        TaskInfo("scenes", SCENE_CLASSES, True, "skimage.data photos, random crops (which photo?)", "columns [0,65%) train, [65%,100%) eval"),
        _gen_scenes,
    ),
    "signs": (
        TaskInfo("signs", SIGN_CLASSES, False, "generated traffic-sign-like shapes on noisy backgrounds", "independent seeds"),
        _gen_signs,
    ),
    "satellite": (
        TaskInfo("satellite", SATELLITE_CLASSES, False, "generated land-use patterns (EuroSAT-like), per-channel colour gain and sensor noise", "independent seeds"),
        _gen_satellite,
    ),
    "svhn_like": (
        TaskInfo("svhn_like", tuple(str(i) for i in range(10)), False, "light font digits with cut neighbours on darker coloured, shaded plates", "independent seeds"),
        _gen_svhn_like,
    ),
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def task_info(name: str) -> TaskInfo:
    """The :class:`TaskInfo` of a demo task; ``ConfigError`` for an unknown name."""
    if name not in TASKS:
        raise ConfigError(f"demo task {name!r} is unknown; the demo tasks are {', '.join(TASK_NAMES)}.")
    return TASKS[name][0]


def generate(name: str, split: str, n: int, seed: int, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 ``[n, S, S, 3]``) and labels (int64 ``[n]``) of one task's split.

    Deterministic in all arguments; train and eval splits never share source
    material (see the module table).
    """
    task_info(name)
    if split not in SPLITS:
        raise ConfigError(f"demo task split {split!r} is unknown; use one of {SPLITS}.")
    # The rng stream is keyed by task and split so adding a task changes no other task's data.
    key = [seed, TASK_NAMES.index(name), SPLITS.index(split), image_size]
    rng = np.random.default_rng(key)
    return TASKS[name][1](split, n, rng, image_size)
