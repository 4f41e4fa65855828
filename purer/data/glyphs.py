"""The built-in glyph dataset: letters rendered from font files, split by script.

Class = character, instance = font face.  :func:`load_glyphs` renders the fonts
that ship inside matplotlib (DejaVu, STIX, Computer Modern), so the dataset
exists on every machine that has purer installed and nothing is downloaded.
:func:`build_font_dataset` runs the same builder over any directory of fonts.

Images are grey, one channel, **white glyph on a black background** (ink = 1),
each glyph centred and scaled, aspect ratio kept, to fill the image minus a
small margin.  Because of the scaling, size alone never tells two letters
apart (``o`` and ``O`` look alike here), which the cleaning accounts for.

Cleaning compares renders drawn at one fixed size, whatever the output size, so
every image size keeps the same classes:

* a face that lacks a character in its cmap (or maps it to ``.notdef``) gives no
  instance of it; a render that equals the face's ``.notdef`` box, or that the
  face draws for many characters alike, is a fallback and is dropped, and so
  is a face most of whose renders are fallbacks (LastResort draws one box per
  Unicode block);
* a face whose renders of a script do not look like the other faces' renders of
  the same characters is dropped for that script (symbol fonts such as
  ``cmex10`` map letters to unrelated shapes);
* empty renders, and renders of a class that duplicate one already kept;
* look-alike classes: two characters that most faces draw alike (Latin ``A``,
  Greek ``Α``, Cyrillic ``А``; ``p`` and ``ρ``) keep one class, the one of the
  script listed first, so nothing leaks from meta-train into meta-val or
  meta-test; where a single face draws a kept class like an earlier one (italic
  Cyrillic ``т`` is an ``m``), that face's render is dropped;
* classes drawn by fewer than ``min_faces`` distinct faces.

Classes with fewer than ``min_instances`` faces are topped up by seeded, small
affine distortions of their faces (rotation, shear, scale, stroke weight).

Example:
    >>> train = load_glyphs("train", image_size=28)           # doctest: +SKIP
    >>> train.name, train.class_names[0], train.image_shape   # doctest: +SKIP
    ('glyphs/train', 'latin:A (U+0041)', (1, 28, 28))
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import tempfile
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from .episodes import ImageSet
from .sources import RECIPE_IMAGE_SIZE

# Bump when a change to the builder changes its output: old caches are then rebuilt.
BUILDER_VERSION = 1

#: Unicode ranges of the letters of each script.  Only letters (categories L*)
#: without a canonical or compatibility decomposition are used, so accented
#: variants (é, ё, ά) and ligatures never become near-copies of their base letter.
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x017F)),
    "greek": ((0x0370, 0x03FF),),
    "cyrillic": ((0x0400, 0x04FF),),
    "armenian": ((0x0531, 0x0556), (0x0561, 0x0587)),
    "georgian": ((0x10A0, 0x10FF),),
    "hebrew": ((0x05D0, 0x05EA),),
    "arabic": ((0x0621, 0x064A),),
    "lao": ((0x0E81, 0x0EDF),),
    "tifinagh": ((0x2D30, 0x2D7F),),
    "nko": ((0x07CA, 0x07EA),),
}

#: Scripts of each split of the built-in dataset, in look-alike priority order:
#: a class that looks like one of an earlier script is dropped.
GLYPH_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("latin", "cyrillic"),
    "val": ("greek",),
    "test": ("armenian", "georgian"),
}

FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
_ANALYSIS_SIZE = 32  # cleaning decisions are made at this size, whatever the output size


@dataclass(frozen=True)
class GlyphConfig:
    """How glyphs are rendered, cleaned and augmented.

    Attributes:
        min_instances: instances per class after augmentation; 20 = 5 shots + 15
            queries, the meta-test protocol's largest episode.
        min_faces: classes drawn by fewer distinct faces are dropped (augmenting
            one or two faces gives no real variety).
        margin: blank border on each side, as a fraction of the image size.
        supersample: glyphs are drawn about this many times larger than the size they
            are compared or output at, then downsampled (smooth edges).
        max_rotation: augmentation rotation, degrees, uniform in ``[-x, x]``.
        max_shear: augmentation horizontal shear factor, uniform in ``[-x, x]``.
        min_scale: augmentation glyph size, a fraction of the full fit in ``[x, 1]``.
        duplicate_distance: renders of one class closer than this are duplicates.
        lookalike_distance: two classes whose same-face renders are closer than
            this (median over shared faces) are look-alikes.
        fallback_repeats: a render drawn alike for more than this many other
            characters of the same face is a fallback shape.
        min_agreement: a face is dropped for a script if fewer than this fraction
            of its renders are nearest to the other faces' renders of the same
            character.
        seed: seed of the augmentation.

    Distances are the ink distance ``|a - b|^2 / (|a|^2 + |b|^2)`` in ``[0, 1]``
    between two ``32 x 32`` renders in ``[0, 1]`` (0: the same image, 1: no common ink).
    """

    min_instances: int = 20
    min_faces: int = 4
    margin: float = 1 / 14
    supersample: int = 4
    max_rotation: float = 12.0
    max_shear: float = 0.25
    min_scale: float = 0.8
    duplicate_distance: float = 0.02
    lookalike_distance: float = 0.05
    fallback_repeats: int = 8
    min_agreement: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.min_instances < 1 or self.min_faces < 1:
            raise ValueError(f"min_instances and min_faces must be positive, "
                             f"got {self.min_instances} and {self.min_faces}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must lie in (0, 1], got {self.min_scale}")


@dataclass
class GlyphReport:
    """What a build kept and removed; ``str(report)`` is a readable summary."""

    faces: list[str] = field(default_factory=list)
    dropped_faces: dict[str, str] = field(default_factory=dict)
    dropped_renders: dict[str, int] = field(default_factory=dict)
    lookalikes: list[tuple[str, str]] = field(default_factory=list)
    too_few_faces: list[str] = field(default_factory=list)
    augmented: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return self.summary(limit=None)

    def summary(self, limit: int | None = 5) -> str:
        """The report with at most ``limit`` examples of each kind of drop (``None``: all of them)."""
        def some(items: list[str]) -> str:
            shown = items if limit is None else items[:limit]
            return ", ".join(shown) + (f", ... ({len(items) - len(shown)} more)" if len(shown) < len(items) else "")

        lines = [f"faces used: {len(self.faces)}; built in {self.seconds:.1f} s; "
                 f"{self.augmented} augmented images added"]
        faces = [f"{f} ({why})" for f, why in sorted(self.dropped_faces.items())]
        if faces:
            lines.append(f"dropped {len(faces)} faces: {some(faces)}" if limit is not None else
                         "\n".join(f"dropped face {f}" for f in faces))
        if self.dropped_renders:
            lines.append(f"dropped renders ({sum(self.dropped_renders.values())}): "
                         + some([f"{k} {v}" for k, v in sorted(self.dropped_renders.items())]))
        if self.lookalikes:
            lines.append(f"dropped {len(self.lookalikes)} look-alike classes: "
                         + some([f"{a} ~ {b}" for a, b in self.lookalikes]))
        if self.too_few_faces:
            lines.append(f"dropped {len(self.too_few_faces)} classes with too few faces: " + some(self.too_few_faces))
        return "\n".join(lines)


# --------------------------------------------------------------------------- rendering

@dataclass
class _Face:
    name: str
    path: Path
    index: int
    cmap: dict[int, str]


def _discover_faces(font_dir: Path, report: GlyphReport) -> list[_Face]:
    from fontTools.ttLib import TTCollection, TTFont, TTLibError

    if not font_dir.is_dir():
        raise FileNotFoundError(f"font directory {font_dir} does not exist; expected a directory holding font files "
                                f"({', '.join(FONT_SUFFIXES)}), searched recursively")
    paths = sorted(p for p in font_dir.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no font files ({', '.join(FONT_SUFFIXES)}) under {font_dir}; "
                                f"put .ttf/.otf/.ttc files there (subdirectories are searched too)")
    faces = []
    for p in paths:
        rel = p.relative_to(font_dir).as_posix()
        try:
            fonts = TTCollection(str(p), lazy=True).fonts if p.suffix.lower() == ".ttc" else [TTFont(str(p), lazy=True)]
            for i, font in enumerate(fonts):
                cmap = font.getBestCmap() or {}
                faces.append(_Face(rel if len(fonts) == 1 else f"{rel}#{i}", p, i, dict(cmap)))
        except (TTLibError, OSError, KeyError, AssertionError) as e:
            report.dropped_faces[rel] = f"unreadable ({type(e).__name__})"
    return faces


def _characters(script: str) -> list[str]:
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; expected one of {sorted(SCRIPTS)}")
    return [chr(c) for lo, hi in SCRIPTS[script] for c in range(lo, hi + 1)
            if unicodedata.category(chr(c)).startswith("L") and not unicodedata.decomposition(chr(c))]


def _class_name(script: str, ch: str) -> str:
    return f"{script}:{ch} (U+{ord(ch):04X})"


def _crop(font: ImageFont.FreeTypeFont, ch: str) -> Image.Image | None:
    """The tight box around the ink of ``ch`` (mode ``L``), or ``None`` when nothing is drawn."""
    left, top, right, bottom = font.getbbox(ch)
    if right <= left or bottom <= top:
        return None
    pad = 4
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - left, pad - top), ch, font=font, fill=255)
    box = img.getbbox()
    return None if box is None else img.crop(box)


def _fit(crop: Image.Image, size: int, margin: float, scale: float = 1.0) -> np.ndarray:
    """``crop`` scaled (aspect kept) to fill ``size`` minus the margin, centred: ``[size, size]`` uint8."""
    inner = max(1.0, (size - 2 * max(1, round(margin * size))) * scale)
    w, h = crop.size
    tw, th = max(1, round(w * inner / max(w, h))), max(1, round(h * inner / max(w, h)))
    small = crop.resize((tw, th), Image.Resampling.BOX if tw <= w else Image.Resampling.BICUBIC)
    out = Image.new("L", (size, size), 0)
    out.paste(small, ((size - tw) // 2, (size - th) // 2))
    return np.asarray(out)


def _morph(a: np.ndarray, radius: int, op: np.ufunc) -> np.ndarray:
    """Grey dilation (``np.maximum``) or erosion (``np.minimum``) of ``a`` ``[H, W]`` by a square of side ``2r + 1``."""
    for axis in (0, 1):
        padded = np.pad(a, [(radius, radius) if ax == axis else (0, 0) for ax in (0, 1)])
        n = a.shape[axis]
        a = functools.reduce(op, (np.take(padded, range(k, k + n), axis=axis) for k in range(2 * radius + 1)))
    return a


def _augment(crop: Image.Image, rng: np.random.Generator, cfg: GlyphConfig, size: int) -> np.ndarray | None:
    """A seeded small affine distortion of ``crop`` with a changed stroke weight: ``[size, size]`` uint8."""
    # Work at a fixed glyph size so that one morphology step is the same stroke change for every
    # glyph; 3x the output is enough for a smooth downsample and keeps the warp cheap.
    work = 3 * size
    w, h = crop.size
    glyph = crop.resize((max(1, round(w * work / max(w, h))), max(1, round(h * work / max(w, h)))),
                        Image.Resampling.BOX if max(w, h) >= work else Image.Resampling.BICUBIC)
    side = round(1.5 * work)  # room for the rotated and sheared glyph
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    stroke = int(rng.integers(-1, 3))  # -1 thinner, 0 as drawn, +1/+2 bolder: 1/3 output pixel per side a step
    if stroke > 0:
        canvas = Image.fromarray(_morph(np.asarray(canvas), stroke, np.maximum))
    elif stroke < 0:
        a = np.asarray(canvas)
        thin = _morph(a, 1, np.minimum)
        # hairlines of serif faces would vanish; keep the drawn weight then
        if thin.sum(dtype=np.int64) > 0.6 * a.sum(dtype=np.int64):
            canvas = Image.fromarray(thin)
    angle = np.deg2rad(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    shear = rng.uniform(-cfg.max_shear, cfg.max_shear)
    scale = rng.uniform(cfg.min_scale, 1.0)
    # PIL wants the output->input map: the inverse of rotate(angle) @ shear, about the centre.
    fwd = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.array([[1, shear], [0, 1]])
    inv = np.linalg.inv(fwd)
    c = np.array([side / 2, side / 2])
    off = c - inv @ c
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE,
                              (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                              resample=Image.Resampling.BILINEAR)
    box = canvas.getbbox()
    return None if box is None else _fit(canvas.crop(box), size, cfg.margin, scale)


def _ink_distance_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ink distance of row ``i`` of ``a`` ``[n, D]`` to row ``i`` of ``b`` ``[n, D]``: ``[n]``."""
    total = np.square(a).sum(1) + np.square(b).sum(1)
    return np.square(a - b).sum(1) / np.maximum(total, 1e-6)


def _ink_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise ink distance ``|a - b|^2 / (|a|^2 + |b|^2)`` of ``a`` ``[n, D]`` and ``b`` ``[m, D]``: ``[n, m]``.

    For non-negative images it lies in ``[0, 1]``: 0 for the same image, 1 when the
    inks do not overlap.  One matrix product computes it.
    """
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    na, nb = a.square().sum(1)[:, None], b.square().sum(1)[None]
    total = na + nb
    return ((total - 2 * a @ b.T).clamp_min(0) / total.clamp_min(1e-6)).numpy()


# --------------------------------------------------------------------------- the builder

@dataclass
class _Render:
    face: int            # index into the face list
    image: np.ndarray    # [size, size] uint8, the output render
    analysis: np.ndarray  # [32 * 32] float32 in [0, 1], what cleaning compares


def _as_float(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32).ravel() / 255


def _render_face(font: ImageFont.FreeTypeFont, out_font: ImageFont.FreeTypeFont, face: _Face, fi: int,
                 chars: list[str], size: int, cfg: GlyphConfig, drops: Counter) -> dict[str, _Render] | str:
    """This face's renders of ``chars``, fallback shapes removed; a reason string if the whole face is a fallback.

    ``font`` draws the analysis renders, ``out_font`` (the same object up to 32 px) the output ones.
    """
    got: dict[str, _Render] = {}
    for ch in chars:
        if face.cmap.get(ord(ch), ".notdef") == ".notdef":
            continue
        crop = _crop(font, ch)
        out = crop if out_font is font or crop is None else _crop(out_font, ch)
        if crop is None or out is None:
            drops["empty"] += 1
            continue
        got[ch] = _Render(fi, _fit(out, size, cfg.margin), _as_float(_fit(crop, _ANALYSIS_SIZE, cfg.margin)))
    if not got:
        return got
    x = np.stack([r.analysis for r in got.values()])
    bad = np.zeros(len(got), dtype=bool)
    # a code point outside the cmap draws .notdef; LastResort maps every code point, so it may have none
    unmapped = next((c for c in (0x10FFFD, 0xFFFF, 0xE000, 0x0378) if c not in face.cmap), None)
    notdef = None if unmapped is None else _crop(font, chr(unmapped))
    if notdef is not None:
        bad |= _ink_distance(x, _as_float(_fit(notdef, _ANALYSIS_SIZE, cfg.margin))[None])[:, 0] \
            < cfg.duplicate_distance
        drops["notdef box"] += int(bad.sum())
    repeated = ((_ink_distance(x, x) < cfg.duplicate_distance).sum(1) - 1 > cfg.fallback_repeats) & ~bad
    drops["fallback shape"] += int(repeated.sum())
    bad |= repeated
    if bad.mean() > 0.5:
        return f"fallback face: {int(bad.sum())} of {len(got)} renders are .notdef boxes or repeated shapes"
    return {ch: r for (ch, r), b in zip(got.items(), bad) if not b}


def _disagreeing_faces(renders: dict[str, list[_Render]], cfg: GlyphConfig) -> dict[int, float]:
    """Faces whose renders are mostly not among the 3 nearest classes of the other faces' renders.

    Returns ``{face: agreement}`` for the faces below ``cfg.min_agreement``.
    """
    chars = [ch for ch, rs in renders.items() if len(rs) >= 2]
    if len(chars) < 4:
        return {}
    sums = np.stack([np.sum([r.analysis for r in renders[ch]], 0) for ch in chars])
    counts = np.array([len(renders[ch]) for ch in chars], dtype=np.float32)
    protos = sums / counts[:, None]
    cls = np.array([ci for ci, ch in enumerate(chars) for _ in renders[ch]])
    face = np.array([r.face for ch in chars for r in renders[ch]])
    x = np.stack([r.analysis for ch in chars for r in renders[ch]])  # [R, D]
    d = _ink_distance(x, protos)  # [R, C]
    own = (sums[cls] - x) / (counts[cls, None] - 1)  # leave each render's face out of its own class
    rows = np.arange(len(x))
    d[rows, cls] = _ink_distance_rows(x, own)
    hit = (d < d[rows, cls][:, None]).sum(1) < 3
    agreement = {int(f): float(hit[face == f].mean()) for f in np.unique(face)}
    return {f: a for f, a in agreement.items() if a < cfg.min_agreement}


def _same_face_distances(keys: list[str], renders: dict[str, list[_Render]], n_faces: int) -> np.ndarray:
    """``[F, C, C]`` ink distance between the renders of two classes by the same face; NaN where a face lacks one.

    Comparing renders of one face cancels the style, so what is left is the shape of the letters.
    """
    per_face = np.full((n_faces, len(keys), len(keys)), np.nan, dtype=np.float32)
    for f in range(n_faces):
        idx, x = [], []
        for k, key in enumerate(keys):
            r = next((r for r in renders[key] if r.face == f), None)
            if r is not None:
                idx.append(k)
                x.append(r.analysis)
        if idx:
            per_face[f][np.ix_(idx, idx)] = _ink_distance(np.stack(x), np.stack(x))
    return per_face


def _build(font_dir: Path, groups: Mapping[str, Sequence[str]], image_size: int, cfg: GlyphConfig,
           name: str) -> tuple[dict[str, ImageSet], GlyphReport]:
    start = time.perf_counter()
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    order = [s for scripts in groups.values() for s in scripts]
    if len(order) != len(set(order)):
        raise ValueError(f"each script may appear once, got {order}")
    script_chars = {s: _characters(s) for s in order}  # validates names before any work
    report = GlyphReport()
    faces = _discover_faces(font_dir, report)
    drops: Counter[str] = Counter()
    all_chars = [ch for s in order for ch in script_chars[s]]
    renders: dict[str, list[_Render]] = {ch: [] for ch in all_chars}
    fonts: dict[int, ImageFont.FreeTypeFont] = {}
    # Glyphs fill about 0.7 em, so these font sizes give supersampled crops.  Cleaning always sees
    # renders of the same font size, so that every output size keeps the same classes.
    analysis_px, out_px = (round(1.5 * s * cfg.supersample) for s in (_ANALYSIS_SIZE, image_size))
    for fi, face in enumerate(faces):
        try:
            font = ImageFont.truetype(str(face.path), size=analysis_px, index=face.index)
            out_font = font if out_px <= analysis_px else \
                ImageFont.truetype(str(face.path), size=out_px, index=face.index)
        except OSError as e:
            report.dropped_faces[face.name] = f"unreadable by FreeType ({e})"
            continue
        got = _render_face(font, out_font, face, fi, all_chars, image_size, cfg, drops)
        if isinstance(got, str):
            report.dropped_faces[face.name] = got
            continue
        fonts[fi] = out_font
        for ch, r in got.items():
            renders[ch].append(r)

    for s in order:
        script_renders = {ch: renders[ch] for ch in script_chars[s]}
        for f, agreement in _disagreeing_faces(script_renders, cfg).items():
            report.dropped_faces[f"{faces[f].name} ({s})"] = \
                f"draws other shapes: {agreement:.0%} of its renders look like the other faces' ones"
            for ch in script_chars[s]:
                drops["disagreeing face"] += sum(r.face == f for r in renders[ch])
                renders[ch] = [r for r in renders[ch] if r.face != f]

    keys: list[tuple[str, str]] = []  # (script, char) in priority order
    for s in order:
        for ch in script_chars[s]:
            kept: list[int] = []
            if renders[ch]:
                near = _ink_distance(*[np.stack([r.analysis for r in renders[ch]])] * 2) < cfg.duplicate_distance
                for i in range(len(near)):
                    if not near[i, kept].any():
                        kept.append(i)
            drops["duplicate"] += len(renders[ch]) - len(kept)
            renders[ch] = kept = [renders[ch][i] for i in kept]
            if len(kept) >= cfg.min_faces:
                keys.append((s, ch))
            elif kept:
                report.too_few_faces.append(_class_name(s, ch))

    per_face = _same_face_distances([ch for _, ch in keys], renders, len(faces))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: pairs with no shared face
        dist = np.nan_to_num(np.nanmedian(per_face, axis=0), nan=np.inf)
    kept_idx: list[int] = []
    for k, (s, ch) in enumerate(keys):
        twin = next((j for j in kept_idx if dist[k, j] < cfg.lookalike_distance), None)
        if twin is None:
            kept_idx.append(k)
        else:
            report.lookalikes.append((_class_name(s, ch), _class_name(*keys[twin])))
    # One face may still draw a kept class like an earlier one (STIX draws digamma as F, italic
    # Cyrillic te is an m): drop that face's render, so that no single image leaks either.
    final: list[int] = []
    for k in kept_idx:
        s, ch = keys[k]
        if final:
            clash = (per_face[:, k, final] < cfg.lookalike_distance).any(1)  # [F]; NaN compares False
            drops["look-alike render"] += sum(bool(clash[r.face]) for r in renders[ch])
            renders[ch] = [r for r in renders[ch] if not clash[r.face]]
        if len(renders[ch]) >= cfg.min_faces:
            final.append(k)
        else:
            report.too_few_faces.append(_class_name(s, ch))
    kept_idx = final

    images: dict[str, list[np.ndarray]] = {}
    for k in kept_idx:
        s, ch = keys[k]
        # renders that differ at the analysis size can still coincide at a small output size
        own = list({r.image.tobytes(): r.image for r in renders[ch]}.values())
        seen = {img.tobytes() for img in own}
        crops = [_crop(fonts[r.face], ch) for r in renders[ch]]
        for a in range(4 * cfg.min_instances):  # a few spare draws in case a distortion repeats an image
            if len(own) >= cfg.min_instances:
                break
            rng = np.random.default_rng([cfg.seed, ord(ch), a])
            img = _augment(crops[a % len(crops)], rng, cfg, image_size)
            if img is not None and img.tobytes() not in seen:
                seen.add(img.tobytes())
                own.append(img)
                report.augmented += 1
        images[_class_name(s, ch)] = own

    report.faces = sorted({faces[r.face].name for k in kept_idx for r in renders[keys[k][1]]})
    report.dropped_renders = dict(drops)
    out = {}
    for group, scripts in groups.items():
        names = [n for n in images if n.split(":", 1)[0] in scripts]
        if not names:
            raise ValueError(f"no class of {group!r} (scripts {list(scripts)}) is drawn by {cfg.min_faces} or more "
                             f"distinct faces under {font_dir}; add fonts that cover it or lower min_faces\n{report}")
        x = [img for n in names for img in images[n]]
        labels = torch.tensor([i for i, n in enumerate(names) for _ in images[n]], dtype=torch.long)
        tensor = torch.from_numpy(np.stack(x)) if x else torch.zeros(0, image_size, image_size, dtype=torch.uint8)
        out[group] = ImageSet(rearrange(tensor, "m h w -> m 1 h w"), labels, names, f"{name}/{group}")
    report.seconds = time.perf_counter() - start
    return out, report


def build_font_dataset(font_dir: str | Path, scripts: Sequence[str] | Mapping[str, Sequence[str]],
                       image_size: int = 28, *, config: GlyphConfig | None = None,
                       name: str = "glyphs") -> tuple[dict[str, ImageSet], GlyphReport]:
    """Render, clean and augment the letters of ``scripts`` from every font under ``font_dir``.

    Args:
        font_dir: a directory searched recursively for ``.ttf``, ``.otf`` and ``.ttc`` files
            (e.g. ``/usr/share/fonts``); each face is one instance of every letter it has.
        scripts: either script names (keys of :data:`SCRIPTS`), giving one set per script,
            or a mapping ``{split: script names}``, giving one set per split.  Order is
            priority: of two look-alike classes, the one of the earlier script is kept.
        image_size: output images are ``[1, image_size, image_size]``, rendered at that size.
        config: rendering, cleaning and augmentation settings.
        name: prefix of each set's name, ``f"{name}/{key}"``.

    Returns:
        ``({key: ImageSet}, report)``: class names like ``"latin:A (U+0041)"``, images uint8
        white on black; the report lists what cleaning removed.

    Raises:
        FileNotFoundError: ``font_dir`` is missing or holds no font file.
        ValueError: an unknown script name, a script listed twice, ``image_size < 8``, or a set
            with no class left (too few faces draw its letters).

    Example:
        >>> sets, report = build_font_dataset("/usr/share/fonts", ["latin", "greek"], 16)  # doctest: +SKIP
        >>> sets["greek"].name                                                           # doctest: +SKIP
        'glyphs/greek'
    """
    groups = dict(scripts) if isinstance(scripts, Mapping) else {s: (s,) for s in scripts}
    if not groups:
        raise ValueError(f"no scripts given; choose from {sorted(SCRIPTS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the products here are small: on a busy machine a thread pool only adds waits
    try:
        return _build(Path(font_dir), groups, image_size, config or GlyphConfig(), name)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the built-in dataset and its cache

def matplotlib_font_dir() -> Path:
    """The directory of the TrueType fonts inside the installed matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def default_data_root() -> Path:
    """``$PURER_DATA_ROOT`` if set, else ``~/.cache/purer``."""
    return Path(os.environ.get("PURER_DATA_ROOT") or Path.home() / ".cache" / "purer")


def glyph_cache_path(image_size: int = 28, data_root: str | Path | None = None) -> Path:
    """Where the built-in dataset at ``image_size`` is cached.

    The file name carries a hash of the builder version, its default settings and
    the font files, so a change to any of them builds a new cache.
    """
    fonts = sorted((p.name, p.stat().st_size) for p in matplotlib_font_dir().iterdir()
                   if p.suffix.lower() in FONT_SUFFIXES)
    key = json.dumps([BUILDER_VERSION, asdict(GlyphConfig()), GLYPH_SPLITS, fonts], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(data_root) if data_root is not None else default_data_root()
    return root / "glyphs" / f"glyphs-{image_size}px-v{BUILDER_VERSION}-{digest}.npz"


def _make_cache_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        raise OSError(f"cannot write the glyph cache to {directory} ({e}); pass data_root= or set "
                      f"$PURER_DATA_ROOT to a writable directory") from e


def _write_cache(path: Path, sets: dict[str, ImageSet], report: GlyphReport) -> None:
    _make_cache_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    arrays = {"report": np.array(json.dumps(asdict(report)))}
    for split, s in sets.items():
        arrays[f"{split}_images"] = s.images.numpy()
        arrays[f"{split}_labels"] = s.labels.numpy()
        arrays[f"{split}_classes"] = np.array(s.class_names)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append ".npz" to a path
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_split(path: Path, split: str) -> ImageSet:
    with np.load(path, allow_pickle=False) as z:
        return ImageSet(torch.from_numpy(z[f"{split}_images"]), torch.from_numpy(z[f"{split}_labels"]),
                        z[f"{split}_classes"].tolist(), f"glyphs/{split}")


def read_glyph_report(image_size: int = 28, data_root: str | Path | None = None) -> GlyphReport:
    """The report of the cached build at ``image_size`` (build it first with :func:`load_glyphs`)."""
    path = glyph_cache_path(image_size, data_root)
    if not path.exists():
        raise FileNotFoundError(f"no glyph cache at {path}; call load_glyphs(split, image_size={image_size}) first")
    with np.load(path, allow_pickle=False) as z:
        d = json.loads(str(z["report"]))
    d["lookalikes"] = [tuple(p) for p in d["lookalikes"]]
    return GlyphReport(**d)


def load_glyphs(split: str, image_size: int = 28, data_root: str | Path | None = None) -> ImageSet:
    """The built-in glyph dataset's ``split``: ``"train"`` | ``"val"`` | ``"test"``.

    Letters of matplotlib's fonts, split by script (:data:`GLYPH_SPLITS`): meta-train
    Latin + Cyrillic, meta-val Greek, meta-test Armenian + Georgian.  Built on first
    use (a few seconds) and cached under ``data_root`` (default ``$PURER_DATA_ROOT``,
    else ``~/.cache/purer``) in ``glyphs/``; other image sizes are rendered at that size.

    Returns:
        An :class:`ImageSet` named ``"glyphs/<split>"``: images ``[M, 1, S, S]`` uint8, white
        on black, at least ``GlyphConfig.min_instances`` per class; class names like
        ``"armenian:Ա (U+0531)"``.

    Raises:
        ValueError: an unknown split or ``image_size < 8``.
        OSError: the cache cannot be written under ``data_root``.
    """
    if split not in GLYPH_SPLITS:
        raise ValueError(f"unknown glyph split {split!r}; expected one of {tuple(GLYPH_SPLITS)}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    path = glyph_cache_path(image_size, data_root)
    if path.exists():
        try:
            return _read_split(path, split)
        except (OSError, ValueError, KeyError) as e:  # a damaged cache is rebuilt, not trusted
            warnings.warn(f"rebuilding the unreadable glyph cache {path} ({e})", stacklevel=2)
    _make_cache_dir(path.parent)  # fail before the build, not after it
    sets, report = build_font_dataset(matplotlib_font_dir(), GLYPH_SPLITS, image_size)
    _write_cache(path, sets, report)
    return sets[split]


def save_preview(sets: Mapping[str, ImageSet], path: str | Path, classes: int = 8, instances: int = 20,
                 seed: int = 0) -> None:
    """Save a PNG grid: for each set, ``classes`` random classes (rows) x ``instances`` images."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in sets.values():
        picked = np.sort(rng.choice(len(s.class_names), size=min(classes, len(s.class_names)), replace=False))
        for c in picked:
            idx = s.members(int(c))[:instances]
            row = torch.zeros(instances, *s.image_shape, dtype=torch.uint8)
            row[:len(idx)] = s.images[idx]
            rows.append(row)
        rows.append(torch.full((instances, *s.image_shape), 128, dtype=torch.uint8))  # grey rule between sets
    grid = rearrange(torch.stack(rows[:-1]), "r n 1 h w -> (r h) (n w)")
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m purer.data.glyphs``: build or load the built-in dataset and describe it."""
    parser = argparse.ArgumentParser(prog="python -m purer.data.glyphs", description=main.__doc__)
    parser.add_argument("--data-root", type=Path, default=None, help="cache directory (default $PURER_DATA_ROOT "
                        "or ~/.cache/purer)")
    parser.add_argument("--image-size", type=int, default=RECIPE_IMAGE_SIZE,
                        help=f"side in pixels (default {RECIPE_IMAGE_SIZE}: the recipe's data.image_size, so its cache)")
    parser.add_argument("--preview", type=Path, default=None, help="save a PNG grid of a few classes per split")
    parser.add_argument("--all-drops", action="store_true", help="list every dropped face, render and class")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cached = glyph_cache_path(args.image_size, args.data_root).exists()
    start = time.perf_counter()
    try:
        sets = {split: load_glyphs(split, args.image_size, args.data_root) for split in GLYPH_SPLITS}
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    took = time.perf_counter() - start
    print(f"{'loaded from cache' if cached else 'built and cached'} in {took:.2f} s: "
          f"{glyph_cache_path(args.image_size, args.data_root)}")
    for split, s in sets.items():
        sizes = s.class_sizes()
        scripts = Counter(n.split(":", 1)[0] for n in s.class_names)
        print(f"{split:5s}  {len(sizes):4d} classes  instances/class min {min(sizes)} median {np.median(sizes):g}  "
              f"images {len(s)}  ({', '.join(f'{k} {v}' for k, v in scripts.items())})")
    print(read_glyph_report(args.image_size, args.data_root).summary(limit=None if args.all_drops else 5))
    if args.preview:
        save_preview(sets, args.preview)
        print(f"preview saved to {args.preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
