"""The colour icon benchmark: a class-per-folder dataset built from freedesktop icon themes.

Class = freedesktop icon name (``folder``, ``edit-copy``, ``audio-volume-high`` ...),
instance = design family (one icon theme together with its Dark / Light / colour
variants).  The images are small colour drawings of everyday concepts, each class
drawn by 10 to 25 independent design families: the closest thing to CIFAR-FS
that installs offline.  On Debian 12 with the themes below: 30 families, 336
classes (169 / 48 / 119), 14 families per class (median).

Install the themes (Debian 12 "bookworm"; about 1.5 GB unpacked).  The seven
``gnome-{brave,dust,human,illustrious,noble,wine,wise}-icon-theme`` packages are
left out on purpose: they recolour the folders of GNOME-Colors and add no drawing::

    apt-get install --no-install-recommends adwaita-icon-theme breeze-icon-theme \\
        deepin-icon-theme elementary-icon-theme elementary-xfce-icon-theme \\
        faba-icon-theme faenza-icon-theme gnome-colors-common gnome-icon-theme \\
        gnome-icon-theme-gartoon gnome-icon-theme-nuovo gnome-icon-theme-suede \\
        gnome-icon-theme-yasis hicolor-icon-theme lxde-icon-theme mate-icon-theme \\
        mint-y-icons moka-icon-theme numix-icon-theme numix-icon-theme-circle \\
        obsidian-icon-theme oxygen-icon-theme paper-icon-theme papirus-icon-theme \\
        sugar-icon-theme suru-icon-theme tango-icon-theme yaru-theme-icon

then build (about half of the themes ship only SVG, which needs cairosvg)::

    pip install 'purer[icons]'
    python -m purer.data.icons build --preview icons.png

and read a split with ``load_split("icons", "train")`` (default root
``$PURER_DATA_ROOT/icons``, else ``~/.cache/purer/icons``).

How the builder (:func:`build_icon_dataset`) decides:

* **Families.**  Every folder of ``theme_root`` holding icons in size folders is a
  theme.  Trailing ``-dark`` / ``-darker`` / ``-darkest`` / ``-light`` /
  ``-semilight`` are stripped (any case), and a theme whose stripped name
  extends another's by ``-<words>`` joins that one (``Mint-Y-Dark-Aqua`` and
  ``Mint-Y-Aqua`` join ``Mint-Y``; ``Yaru-bark-dark`` joins ``Yaru``).  Themes that
  are symlinks to one folder count once.  For each icon name a family uses its
  first member theme that has it: the base theme, then colour variants, then
  dark ones (whose white-on-dark drawings would vanish on white).
* **Which file.**  Among the theme's files for the name, the size nearest
  ``source_size`` (48) px: fixed-size folders (``48x48/``, ``48/``, ``apps/48/``,
  ``48x48@2x/`` with its design size 48) and ``scalable/`` SVGs, which count as
  48 (fixed sizes win ties, and so does the larger of two sizes equally far).
  Symbolic icons (``*-symbolic``, ``symbolic/``) are skipped: they are
  monochrome line art of the same concepts.
* **Pixels.**  SVGs are rendered at their folder's size (``scalable``: 48 px)
  without fetching anything; the RGBA image is composited on white, padded to a
  square with white and resized (Lanczos) to ``size x size`` RGB.  An image with
  less than ``min_ink`` of its pixels away from white is dropped (white icons
  meant for dark panels).
* **Aliases and copies.**  Symlinks are resolved, and images identical pixel
  for pixel are one drawing: kept once, under the name that the most families
  have (so ``inode-directory`` folds into ``folder``), in the first family that
  has it (families ordered by their number of icons, most first) -- this
  collapses copied aliases inside a theme and files copied between themes.  Two
  names that at least ``concept_share`` (half) of the families having both
  draw identically, and two families at least, are one concept (``gtk-cdrom``
  and ``media-optical``): merged into the name more families have, even where
  other families draw them apart.  Within a class, an image
  whose RMSE (pixels in ``[0, 1]``) to an earlier family's image is at most
  ``duplicate_rmse`` is a near copy (gnome / mate) and is dropped.
* **Classes and splits.**  Classes drawn by at least ``min_families`` families are
  kept.  Names are grouped by their first word (``folder``, ``folder-open`` and
  ``folder-remote`` form the group ``folder``) and whole groups are dealt, in an
  order shuffled by ``seed``, to the split furthest below its share of
  ``fractions`` (meta-train / meta-val / meta-test, 50 / 15 / 35 %), so test
  classes are genuinely new.

Output, written to a temporary folder beside ``out_dir`` and renamed into place::

    out_dir/{train,val,test}/<icon name>/<family>.png
    out_dir/report.json        what was kept, dropped and why (:class:`IconReport`)

A class has as many images as families (10 or more with the default
``min_families``), so 5-shot episodes leave 5 or more queries per class: sample
with ``EpisodeSampler(..., query=15)``, which takes as many queries as remain after
the support, at most 15.

Example:
    >>> report = build_icon_dataset("/usr/share/icons", "data/icons")  # doctest: +SKIP
    >>> train = load_icons("train", "data/icons")                       # doctest: +SKIP
    >>> train.image_shape, len(train.class_names)                       # doctest: +SKIP
    ((3, 32, 32), 169)
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from .episodes import SPLITS, ImageSet
from .glyphs import default_data_root

# Bump when a change to the builder changes its output.
BUILDER_VERSION = 1

DEFAULT_THEME_ROOT = Path("/usr/share/icons")

#: The Debian packages of the benchmark's themes (see the module docstring).
APT_PACKAGES = (
    "adwaita-icon-theme", "breeze-icon-theme", "deepin-icon-theme", "elementary-icon-theme",
    "elementary-xfce-icon-theme", "faba-icon-theme", "faenza-icon-theme", "gnome-colors-common",
    "gnome-icon-theme", "gnome-icon-theme-gartoon", "gnome-icon-theme-nuovo", "gnome-icon-theme-suede",
    "gnome-icon-theme-yasis", "hicolor-icon-theme", "lxde-icon-theme", "mate-icon-theme", "mint-y-icons",
    "moka-icon-theme", "numix-icon-theme", "numix-icon-theme-circle", "obsidian-icon-theme",
    "oxygen-icon-theme", "paper-icon-theme", "papirus-icon-theme", "sugar-icon-theme", "suru-icon-theme",
    "tango-icon-theme", "yaru-theme-icon",
)
APT_COMMAND = "apt-get install --no-install-recommends " + " ".join(APT_PACKAGES)

ICON_SUFFIXES = (".png", ".svg")
_SHADE = r"(?:dark(?:er|est)?|(?:semi)?light(?:er)?)"
_VARIANT_SUFFIX = re.compile(rf"[-_]{_SHADE}$", re.IGNORECASE)
_SHADE_WORD = re.compile(rf"(?:^|[-_]){_SHADE}(?:$|[-_])", re.IGNORECASE)
# Size folders: 48, 48x48, 48x48@2x; scalable; scalable-up-to-32 (mate's SVGs drawn for small sizes).
_FIXED_DIR = re.compile(r"^(\d+)(?:x\d+)?(?:@(\d+)x)?$")
_SCALABLE_DIR = re.compile(r"^(?:scalable)?-?(?:(?:up-to|max)-(\d+))?$")


@dataclass
class IconReport:
    """What a build kept and dropped; saved as ``report.json``, ``str(report)`` summarises it.

    Attributes:
        theme_root: the folder the themes were read from.
        families: family -> its member theme folders, in the order they are consulted.
        splits: split -> its class (icon) names.
        families_per_class: class -> number of families (= images) kept.
        dropped_images: ``[family, name, reason]`` of every image dropped from a name
            that some ``min_families`` families have.
        dropped_classes: class -> families left, for names that had enough families
            before cleaning but not after.
        merged_names: name -> the name it was merged into (one concept, two names).
        rare_names: icon names that fewer than ``min_families`` families have at all.
        skipped_files: reason -> number of icon files never considered.
        settings: the build's arguments.
        seconds: build time.
    """

    theme_root: str = ""
    families: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, list[str]] = field(default_factory=dict)
    families_per_class: dict[str, int] = field(default_factory=dict)
    dropped_images: list[list[str]] = field(default_factory=list)
    dropped_classes: dict[str, int] = field(default_factory=dict)
    merged_names: dict[str, str] = field(default_factory=dict)
    rare_names: int = 0
    skipped_files: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    builder_version: int = BUILDER_VERSION
    seconds: float = 0.0

    def __str__(self) -> str:
        counts = sorted(self.families_per_class.values())
        lines = [f"{sum(len(m) for m in self.families.values())} themes in {len(self.families)} families "
                 f"from {self.theme_root}; built in {self.seconds:.1f} s",
                 "classes: " + ", ".join(f"{s} {len(c)}" for s, c in self.splits.items())
                 + (f"; families per class min {counts[0]} median {np.median(counts):g} max {counts[-1]}"
                    if counts else "")]
        reasons = Counter(r.split(" (")[0] for _, _, r in self.dropped_images)
        if reasons:
            lines.append("dropped images: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
        lines.append(f"merged names: {len(self.merged_names)} into {len(set(self.merged_names.values()))}; "
                     f"dropped classes: {len(self.dropped_classes)} fell below min_families after cleaning, "
                     f"{self.rare_names} names had too few families to begin with")
        if self.skipped_files:
            lines.append("skipped files: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped_files.items())))
        return "\n".join(lines)


class _IconFile(NamedTuple):
    size: int  # design size in px (scalable: the requested source size)
    scale: int  # the @2x of HiDPI folders
    scalable: bool
    path: str  # symlinks resolved


# --------------------------------------------------------------------------- themes and families

def _strip_variant(name: str) -> str:
    while (m := _VARIANT_SUFFIX.search(name)) and m.start() > 0:
        name = name[:m.start()]
    return name


def _dir_size(part: str, source_size: int) -> tuple[int, int, bool] | None:
    """``(design size, scale, scalable)`` of a folder name, or ``None`` for a context folder (``apps``)."""
    if m := _FIXED_DIR.match(part):
        return int(m[1]), int(m[2] or 1), False
    if part.startswith(("scalable", "up-to", "max-")) and (m := _SCALABLE_DIR.match(part)):
        return (int(m[1]), 1, False) if m[1] else (source_size, 1, True)
    return None


def _index_theme(theme: Path, source_size: int, skipped: Counter) -> dict[str, list[_IconFile]]:
    """Icon name -> its files in ``theme`` (any layout: ``48x48/apps/``, ``apps/48/``, ``base/48x48/apps/``)."""
    files: dict[str, list[_IconFile]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(theme, followlinks=True):
        real = os.path.realpath(dirpath)
        # A folder link to an ancestor would make the walk endless.
        dirnames[:] = sorted(d for d in dirnames if not (real + os.sep).startswith(
            os.path.realpath(os.path.join(dirpath, d)) + os.sep))
        parts = Path(dirpath).relative_to(theme).parts
        sizes = [s for s in (_dir_size(p, source_size) for p in parts) if s is not None]
        for f in filenames:
            stem, ext = os.path.splitext(f)
            if ext.lower() not in ICON_SUFFIXES:
                continue
            path = os.path.join(dirpath, f)
            real = os.path.realpath(path)
            # A name may link to a symbolic drawing (bloom's audio-volume-high).
            if stem.endswith("-symbolic") or "symbolic" in parts or Path(real).stem.endswith("-symbolic"):
                skipped["symbolic"] += 1
            elif not sizes:
                skipped["not in a size folder"] += 1
            elif not os.path.exists(real):
                skipped["broken link"] += 1
            else:
                files[stem].append(_IconFile(*sizes[-1], real))
    return files


def theme_families(theme_root: str | Path = DEFAULT_THEME_ROOT) -> dict[str, list[str]]:
    """Group the theme folders of ``theme_root`` into design families.

    Returns:
        family name -> member theme folder names, in the order their icons are
        consulted (the base theme, colour variants, then dark/light ones); families
        sorted by name.  Folders are not checked for icons here.

    Example:
        >>> theme_families("/usr/share/icons")["Papirus"]  # doctest: +SKIP
        ['Papirus', 'Papirus-Dark', 'Papirus-Light']
    """
    root = Path(theme_root)
    if not root.is_dir():
        raise FileNotFoundError(f"no icon themes at {root}: expected {root}/<theme>/index.theme and size folders "
                                f"(install them with: {APT_COMMAND})")
    by_real: dict[str, str] = {}
    # Real folders before links to them, so a linked theme takes the name of its target.
    for d in sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                    key=lambda d: (d.is_symlink(), d.name)):
        by_real.setdefault(os.path.realpath(d), d.name)
    stripped = {name: _strip_variant(name) for name in by_real.values()}
    bases = sorted(set(stripped.values()), key=lambda s: (len(s), s))
    families: dict[str, list[str]] = defaultdict(list)
    for name, s in stripped.items():
        family = next(b for b in bases if s.lower() == b.lower() or s.lower().startswith(b.lower() + "-"))
        families[family].append(name)
    return {f: sorted(m, key=lambda n: (n.lower() != f.lower(), bool(_SHADE_WORD.search(n)), len(n), n))
            for f, m in sorted(families.items(), key=lambda kv: kv[0].lower())}


def _nearest(files: list[_IconFile], source_size: int) -> _IconFile:
    return min(files, key=lambda f: (abs(f.size - source_size), f.size < source_size, f.scale != 1,
                                     f.scalable, not f.path.endswith(".png"), f.path))


# --------------------------------------------------------------------------- pixels

def _svg_renderer():
    try:
        import cairosvg
    except ImportError as e:
        raise ImportError("the icon themes include SVG-only icons, which need cairosvg: "
                          "pip install 'purer[icons]' (or pip install 'cairosvg>=2.7')") from e
    return cairosvg


def _to_rgb(im: Image.Image, size: int) -> np.ndarray:
    """An icon as ``[size, size, 3]`` uint8: composited on white, padded square, resized."""
    im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, im).convert("RGB")
    if rgb.width != rgb.height:
        side = max(rgb.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        rgb = square
    return np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS))


_DOCTYPE = re.compile(rb"<!DOCTYPE[^\[>]*(?:\[.*?\])?\s*>", re.DOTALL)
_ENTITY = re.compile(rb"<!ENTITY\s+([\w.:-]+)\s+([\"'])(.*?)\2\s*>", re.DOTALL)


def _expand_entities(svg: bytes) -> bytes:
    """Inline the internal entities of the DOCTYPE and remove it.

    Illustrator exports declare namespaces as entities (``<!ENTITY ns_svg "...">``),
    which cairosvg's safe parser refuses; external (``SYSTEM``) entities are not
    expanded, so such a file stays unreadable.
    """
    doctype = _DOCTYPE.search(svg)
    if doctype is None:
        return svg
    body = svg[:doctype.start()] + svg[doctype.end():]
    for name, _, value in _ENTITY.findall(doctype[0]):
        body = body.replace(b"&" + name + b";", value)
    return body


def _render(f: _IconFile, size: int) -> np.ndarray:
    if f.path.endswith(".svg"):
        px = f.size * f.scale
        # From bytes, so cairosvg's default fetcher refuses anything outside the file (no network).
        svg = _expand_entities(Path(f.path).read_bytes())
        png = _svg_renderer().svg2png(bytestring=svg, output_width=px, output_height=px)
        im = Image.open(io.BytesIO(png))
    else:
        im = Image.open(f.path)
    with im:
        return _to_rgb(im, size)


def ink_fraction(img: np.ndarray) -> float:
    """Fraction of the pixels of an RGB ``[H, W, 3]`` uint8 image that are visibly not white."""
    return float(((255 - img.astype(np.int16)).max(axis=-1) > 16).mean())


# --------------------------------------------------------------------------- splits

def split_classes(names: Sequence[str], fractions: Sequence[float] = (0.5, 0.15, 0.35),
                  seed: int = 0) -> dict[str, list[str]]:
    """Deal class names to train / val / test, keeping each first-word group in one split.

    Groups (the part of a name before the first ``-``) are visited in an order
    shuffled by ``seed``; each goes whole to the split furthest below its share
    ``fractions[i] * len(names)``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, names sorted.

    Raises:
        ValueError: for fractions that are not three positive numbers, or when a
            split would be empty (too few groups).
    """
    if len(fractions) != len(SPLITS) or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive shares of train/val/test, got {tuple(fractions)}")
    groups: dict[str, list[str]] = defaultdict(list)
    for n in sorted(names):
        groups[n.split("-", 1)[0]].append(n)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    target = np.asarray(fractions, dtype=float) / sum(fractions) * len(names)
    have = np.zeros(len(SPLITS))
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i in order:
        s = int(np.argmax(target - have))
        out[SPLITS[s]] += groups[keys[i]]
        have[s] += len(groups[keys[i]])
    if empty := [s for s in SPLITS if not out[s]]:
        raise ValueError(f"{len(names)} classes in {len(keys)} name groups leave the {'/'.join(empty)} split empty; "
                         "lower min_families or install more icon themes")
    return {s: sorted(v) for s, v in out.items()}


# --------------------------------------------------------------------------- build

def _collect(theme_root: Path, source_size: int, min_families: int, report: IconReport
             ) -> dict[tuple[str, str], _IconFile]:
    """(family, name) -> the chosen file, for the names at least ``min_families`` families have."""
    skipped: Counter = Counter()
    chosen: dict[tuple[str, str], _IconFile] = {}
    for family, members in theme_families(theme_root).items():
        indexes = [(m, _index_theme(theme_root / m, source_size, skipped)) for m in members]
        used = [m for m, idx in indexes if idx]
        if not used:
            continue
        report.families[family] = used
        for name in sorted({n for _, idx in indexes for n in idx}):
            files = next(idx[name] for _, idx in indexes if name in idx)
            chosen[family, name] = _nearest(files, source_size)
    report.skipped_files = dict(skipped)
    if not chosen:
        raise FileNotFoundError(f"no icons found under {theme_root}: expected <theme>/<size>/<context>/<name>.png "
                                f"or .svg (e.g. 48x48/apps/, apps/48/, scalable/apps/); install themes with: "
                                f"{APT_COMMAND}")
    counts = Counter(name for _, name in chosen)
    report.rare_names = sum(c < min_families for c in counts.values())
    return {k: f for k, f in chosen.items() if counts[k[1]] >= min_families}


def _render_all(chosen: dict[tuple[str, str], _IconFile], size: int, min_ink: float,
                report: IconReport) -> dict[tuple[str, str], np.ndarray]:
    if any(f.path.endswith(".svg") for f in chosen.values()):
        _svg_renderer()  # fail before hours of rendering, not in the middle
    cache: dict[str, np.ndarray | str] = {}
    images: dict[tuple[str, str], np.ndarray] = {}
    for key, f in chosen.items():
        if f.path not in cache:
            try:
                cache[f.path] = _render(f, size)
            except Exception as e:  # noqa: BLE001 -- cairosvg and Pillow raise many types for a bad file
                cache[f.path] = f"unreadable ({type(e).__name__}: {e})"
        img = cache[f.path]
        if isinstance(img, str):
            report.dropped_images.append([*key, img])
        elif ink_fraction(img) < min_ink:
            report.dropped_images.append([*key, f"blank on white ({f.path})"])
        else:
            images[key] = img
    return images


def _merge_concepts(images: dict[tuple[str, str], np.ndarray], concept_share: float,
                    report: IconReport) -> dict[tuple[str, str], np.ndarray]:
    """Rename names that most families having both draw identically to one name.

    Legacy names live on as distinct drawings in some themes (``gtk-cdrom`` and
    ``media-optical``); left apart they would be one concept in two classes,
    possibly in two splits.  A share, not a count, decides: a few themes draw a
    plain page for ``application-pdf``, most draw a PDF.
    """
    counts = Counter(name for _, name in images)
    names_of: dict[str, list[str]] = defaultdict(list)
    drawings: dict[tuple[str, bytes], list[str]] = defaultdict(list)
    for (fam, name), img in sorted(images.items(), key=lambda kv: kv[0]):
        names_of[fam].append(name)
        drawings[fam, hashlib.sha256(img.tobytes()).digest()].append(name)
    same = Counter(pair for names in drawings.values() for pair in itertools.combinations(names, 2))
    both = Counter(pair for names in names_of.values() for pair in itertools.combinations(names, 2)
                   if pair in same)
    rank = {n: (-c, n) for n, c in counts.items()}
    partners: dict[str, list[str]] = defaultdict(list)
    for (a, b), k in same.items():
        # Two families at least: one theme's choice is no consensus.
        if k >= 2 and k >= concept_share * both[a, b]:
            partners[a].append(b)
            partners[b].append(a)
    into: dict[str, str] = {}
    # Best-ranked names first, each joining its best partner that stays a class: a name is
    # merged only with a partner it is itself drawn like, never through a chain
    # (application-pdf ~ gnome-mime-application-pdf ~ ... ~ x-office-document).
    for name in sorted(partners, key=rank.__getitem__):
        targets = [b for b in partners[name] if rank[b] < rank[name] and b not in into]
        if targets:
            into[name] = min(targets, key=rank.__getitem__)
    report.merged_names = dict(sorted(into.items()))
    merged: dict[tuple[str, str], np.ndarray] = {}
    for fam, name in sorted(images, key=lambda k: (k[0], rank[k[1]])):
        canon = into.get(name, name)
        if (fam, canon) in merged:
            report.dropped_images.append([fam, name, f"merged name (into {canon}, which {fam} also draws)"])
        else:
            merged[fam, canon] = images[fam, name]
    return merged


def _drop_copies(images: dict[tuple[str, str], np.ndarray], duplicate_rmse: float,
                 report: IconReport) -> dict[str, dict[str, np.ndarray]]:
    """Class -> family -> image, one image per drawing."""
    counts = Counter(name for _, name in images)
    # The original of a copied theme is usually the bigger one (Papirus, not ePapirus): it keeps the drawing.
    sizes = Counter(fam for fam, _ in images)
    order = {fam: i for i, fam in enumerate(sorted(sizes, key=lambda f: (-sizes[f], f.lower(), f)))}
    by_hash: dict[bytes, list[tuple[str, str]]] = defaultdict(list)
    for key in sorted(images, key=lambda k: (order[k[0]], k[1])):
        by_hash[hashlib.sha256(images[key].tobytes()).digest()].append(key)
    classes: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for keys in by_hash.values():
        name = min((n for _, n in keys), key=lambda n: (-counts[n], n))
        keep = next(k for k in keys if k[1] == name)
        classes[name][keep[0]] = images[keep]
        for fam, n in keys:
            if (fam, n) != keep:
                why = "alias" if fam == keep[0] else "copy"
                report.dropped_images.append([fam, n, f"{why} (identical to {keep[0]}/{name})"])
    for name, fams in classes.items():
        kept: dict[str, np.ndarray] = {}
        for fam in sorted(fams, key=order.__getitem__):
            img = fams[fam].astype(np.float32) / 255
            near = next((k for k, other in kept.items()
                         if np.sqrt(np.mean((img - other) ** 2)) <= duplicate_rmse), None)
            if near is None:
                kept[fam] = img
            else:
                report.dropped_images.append([fam, name, f"near copy (of {near}/{name})"])
        classes[name] = {fam: fams[fam] for fam in kept}
    return classes


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    if not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file()):
        raise FileExistsError(f"{out} exists and is not an icon dataset (no report.json); remove it or choose "
                              "another output folder")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def default_icon_root() -> Path:
    """``$PURER_DATA_ROOT/icons`` if set, else ``~/.cache/purer/icons``."""
    return default_data_root() / "icons"


def build_icon_dataset(theme_root: str | Path = DEFAULT_THEME_ROOT, out_dir: str | Path | None = None,
                       min_families: int = 10, size: int = 32, seed: int = 0, source_size: int = 48,
                       fractions: Sequence[float] = (0.5, 0.15, 0.35), duplicate_rmse: float = 0.03,
                       min_ink: float = 0.02, concept_share: float = 0.5) -> IconReport:
    """Build the icon benchmark from the themes in ``theme_root`` (see the module docstring).

    Args:
        theme_root: folder of icon themes (``/usr/share/icons``).
        out_dir: output folder (default :func:`default_icon_root`); replaced
            atomically if it holds an earlier build, refused if it holds anything else.
        min_families: classes drawn by fewer families are dropped.
        size: output images are ``size x size`` RGB.
        seed: seed of the class split.
        source_size: preferred design size of the source icons, px.
        fractions: shares of classes for train / val / test.
        duplicate_rmse: images of one class closer than this (RMSE, pixels in ``[0, 1]``)
            are near copies.
        min_ink: images with fewer non-white pixels than this fraction are dropped.
        concept_share: two names are one class (under the name more families have)
            when at least this share of the families that have both, and two
            families at least, draw them identically.

    Returns:
        The :class:`IconReport`, also saved as ``out_dir/report.json``.

    Raises:
        FileNotFoundError: no themes or no icons under ``theme_root``.
        ImportError: SVG icons but no cairosvg (``pip install 'purer[icons]'``).
        ValueError: bad arguments, or too few classes survive for three splits.
        FileExistsError: ``out_dir`` holds something other than an icon dataset.
    """
    if min_families < 1 or size < 8 or source_size < 8:
        raise ValueError(f"need min_families >= 1, size >= 8 and source_size >= 8, got {min_families}, {size}, "
                         f"{source_size}")
    if not 0 <= duplicate_rmse < 1 or not 0 <= min_ink < 1 or not 0 < concept_share <= 1:
        raise ValueError(f"duplicate_rmse and min_ink must lie in [0, 1) and concept_share in (0, 1], got "
                         f"{duplicate_rmse}, {min_ink} and {concept_share}")
    start = time.perf_counter()
    theme_root = Path(theme_root)
    out = Path(out_dir) if out_dir is not None else default_icon_root()
    report = IconReport(theme_root=str(theme_root), settings=dict(
        min_families=min_families, size=size, seed=seed, source_size=source_size, fractions=list(fractions),
        duplicate_rmse=duplicate_rmse, min_ink=min_ink, concept_share=concept_share))
    chosen = _collect(theme_root, source_size, min_families, report)
    images = _merge_concepts(_render_all(chosen, size, min_ink, report), concept_share, report)
    classes = _drop_copies(images, duplicate_rmse, report)
    prefiltered = {name for _, name in chosen} - set(report.merged_names)
    report.dropped_classes = {n: len(classes.get(n, {})) for n in sorted(prefiltered)
                              if len(classes.get(n, {})) < min_families}
    kept = sorted(n for n in classes if len(classes[n]) >= min_families)
    report.splits = split_classes(kept, fractions, seed)
    report.families_per_class = {n: len(classes[n]) for n in kept}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split, names in report.splits.items():
            for name in names:
                (tmp / split / name).mkdir(parents=True)
                for fam, img in classes[name].items():
                    Image.fromarray(img).save(tmp / split / name / f"{fam}.png")
        report.seconds = round(time.perf_counter() - start, 2)
        (tmp / "report.json").write_text(json.dumps(asdict(report), indent=1))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# --------------------------------------------------------------------------- reading

def _built_root(root: str | Path | None) -> Path:
    root = Path(root) if root is not None else default_icon_root()
    if not (root / "report.json").is_file():
        raise FileNotFoundError(f"no icon dataset at {root} (expected {root}/{{train,val,test}}/<icon name>/"
                                f"<family>.png and report.json): install the themes with `{APT_COMMAND}`, "
                                f"then run `python -m purer.data.icons build --out {root}`")
    return root


def load_icons(split: str, root: str | Path | None = None, image_size: int | None = None) -> ImageSet:
    """The ``split`` (``"train"`` | ``"val"`` | ``"test"``) of a built icon dataset.

    Returns:
        An RGB :class:`ImageSet` named ``"icons/<split>"``: images ``[M, 3, S, S]``
        uint8 (``S`` the built size unless ``image_size`` is given), one per family.
    """
    from .folders import load_split_folders

    s = load_split_folders(_built_root(root), split, image_size=image_size)
    s.name = f"icons/{split}"
    return s


def read_icon_report(root: str | Path | None = None) -> IconReport:
    """The :class:`IconReport` of the build at ``root`` (default :func:`default_icon_root`)."""
    return IconReport(**json.loads((_built_root(root) / "report.json").read_text()))


def save_icon_preview(root: str | Path | None, path: str | Path, classes: int = 8, instances: int = 16,
                      seed: int = 0) -> None:
    """Save a PNG grid: per split, ``classes`` random classes (rows) x up to ``instances`` families."""
    rng = np.random.default_rng(seed)
    rows = []
    for split in SPLITS:
        s = load_icons(split, root)
        for c in np.sort(rng.choice(len(s.class_names), size=min(classes, len(s.class_names)), replace=False)):
            idx = s.members(int(c))[:instances]
            row = np.full((instances, *s.image_shape), 255, dtype=np.uint8)
            row[:len(idx)] = s.images[idx].numpy()
            rows.append(row)
        rows.append(np.full((instances, *s.image_shape), 128, dtype=np.uint8))  # grey rule between splits
    grid = np.stack(rows[:-1])
    r, n, c, h, w = grid.shape
    grid = grid.transpose(0, 3, 1, 4, 2).reshape(r * h, n * w, c)
    Image.fromarray(grid).resize((n * w * 2, r * h * 2), Image.Resampling.NEAREST).save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m purer.data.icons build``: build the colour icon benchmark from installed icon themes."""
    epilog = (f"Install the themes first (Debian 12):\n  {APT_COMMAND}\n"
              "and cairosvg for the SVG-only themes:\n  pip install 'purer[icons]'")
    parser = argparse.ArgumentParser(prog="python -m purer.data.icons", description=main.__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the dataset", description=main.__doc__, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--themes", type=Path, default=DEFAULT_THEME_ROOT, help="icon theme folder (default "
                       "%(default)s)")
    build.add_argument("--out", type=Path, default=None, help="output folder (default $PURER_DATA_ROOT/icons or "
                       "~/.cache/purer/icons)")
    build.add_argument("--min-families", type=int, default=10)
    build.add_argument("--size", type=int, default=32)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--preview", type=Path, default=None, help="save a PNG grid of a few classes per split")
    args = parser.parse_args(argv)
    try:
        report = build_icon_dataset(args.themes, args.out, min_families=args.min_families, size=args.size,
                                    seed=args.seed)
        out = args.out if args.out is not None else default_icon_root()
        print(f"wrote {out}")
        print(report)
        if args.preview:
            import torch

            torch.set_num_threads(1)
            save_icon_preview(out, args.preview)
            print(f"preview saved to {args.preview}")
    except (OSError, ValueError, ImportError) as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
