"""Build the ``stamps`` dataset: tuxpaint object cut-outs pasted onto real background images.

Each tuxpaint stamp ``X.png`` has an alpha channel (an exact object mask) and ``X.txt`` whose first line is an
English caption. An image is a random crop of a background (scikit-image's bundled photographs and, by
default, Debian's gnome-backgrounds rasters) with 1-4 cut-outs alpha-composited on top, each later cut-out
occluding the earlier ones. Instance masks are the *visible* pixels of each object (alpha >= 0.5 and not
covered by a later object's alpha >= 0.5); a placement that would leave any object with too few visible pixels
is re-drawn, so every visible object is annotated. Stamps are split train/test per category, so test images
hold objects never seen in training.

Deterministic: image i of a split is a pure function of (spec, split, i) through ``np.random.default_rng``
seeded with [seed, split, i], so the same spec writes byte-identical images and JSON.

Output (the issue-4 contract): ``images/{split}/NNNNNN.png``, ``{split}.json`` (COCO instances with RLE
masks and captions), ``meta.json``. ``python -m sslab.dataset_builders.stamps --out DIR`` builds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sslab.errors import SSLabError

FORMAT_VERSION = 1
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
GNOME_DIR = Path("/usr/share/backgrounds/gnome")
INSTALL_HINT = "run `make install-stamps` or `apt-get install tuxpaint-stamps-default gnome-backgrounds`"
SPLITS = ("train", "test")

# scikit-image photographs that ship inside the wheel (no pooch download); greyscale ones are replicated to RGB.
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "stereo_motorcycle",
)
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines a build's content (its hash names the cache directory)."""

    image_size: int = 64
    num_train: int = 2000
    num_test: int = 500
    seed: int = 0
    gnome: bool = True  # add gnome-backgrounds rasters to the scikit-image photos
    scale: tuple[float, float] = (0.25, 0.6)  # an object's longer side, as a fraction of the image side
    max_objects: int = 4
    test_fraction: float = 0.2  # share of each category's stamps held out for the test split
    min_visible: float = 0.3  # an object keeps at least this fraction of its own pixels visible
    min_area: float = 0.01  # ... and at least this fraction of the image
    tries: int = 10  # placements tried per object before giving it up

    def dirname(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        return f"s{self.image_size}-n{self.num_train}-{self.num_test}-seed{self.seed}-{digest}"


@dataclass(frozen=True)
class Stamp:
    path: str  # relative to the stamps directory
    category: str  # first path component
    caption: str  # first line of X.txt
    phrase: str  # short form used in image captions


# -- captions ---------------------------------------------------------------------------------------------
ARTICLES = frozenset({"A", "An", "The", "Another", "Some", "This", "These", "Two", "Three", "Four", "Many"})
# A phrase stops before the first of these words once it has two words ("a stethoscope lets your ..." ->
# "a stethoscope"): tuxpaint captions often go on into a sentence about the object.
STOP_WORDS = frozenset(
    {
        "is",
        "are",
        "was",
        "were",
        "lets",
        "can",
        "like",
        "that",
        "which",
        "who",
        "gets",
        "has",
        "have",
        "will",
        "to",
    }
)
TRAILING = frozenset({"a", "an", "the", "with", "of", "for", "in", "on", "or", "and", "at", "by"})


def short_phrase(caption: str, max_words: int = 7) -> str:
    """A short noun phrase for image captions: the caption's first clause, cut before a verb-like word after
    the second word, at most ``max_words`` words, a leading article lower-cased ("A stethoscope lets your
    doctor listen..." -> "a stethoscope")."""
    first = re.split(r"[.!?](?:\s|$)|[,;:(\u2014]", caption, maxsplit=1)[0].strip()
    words = first.split() or caption.split()
    for k in range(2, len(words)):
        if words[k].lower() in STOP_WORDS:
            words = words[:k]
            break
    words = words[:max_words]
    while len(words) > 1 and words[-1].lower() in TRAILING:  # "... with a" -> "..."
        words = words[:-1]
    if words and words[0] in ARTICLES:
        words[0] = words[0].lower()
    return " ".join(words)


def compose_caption(phrases: list[str]) -> str:
    """ "x.", "x and y.", "x, y and z." (objects in the order given: largest first)."""
    if len(phrases) == 1:
        return f"{phrases[0]}."
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}."


# -- sources ----------------------------------------------------------------------------------------------
def list_stamps(stamps_dir: Path) -> list[Stamp]:
    """Every ``X.png`` with a non-empty ``X.txt`` beside it, sorted by path (svg-only and caption-less
    stamps, e.g. the ``_mirror`` variants, are skipped)."""
    if not stamps_dir.is_dir():
        raise SSLabError(f"tuxpaint stamps not found at {stamps_dir}; {INSTALL_HINT}")
    stamps = []
    for png in sorted(stamps_dir.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff").splitlines()
        caption = lines[0].strip() if lines else ""
        if not caption:
            continue
        rel = png.relative_to(stamps_dir)
        stamps.append(Stamp(rel.as_posix(), rel.parts[0], caption, short_phrase(caption)))
    if not stamps:
        raise SSLabError(f"no captioned stamps (X.png + X.txt) under {stamps_dir}; {INSTALL_HINT}")
    return stamps


def split_stamps(stamps: list[Stamp], seed: int, test_fraction: float) -> dict[str, list[Stamp]]:
    """Disjoint per-category split: a seeded permutation of each category's sorted stamps puts
    round(n * test_fraction) of them (at least one when n >= 2) in test."""
    rng = np.random.default_rng([seed, 7])
    out: dict[str, list[Stamp]] = {"train": [], "test": []}
    for cat in sorted({s.category for s in stamps}):
        members = [s for s in stamps if s.category == cat]
        n_test = 0 if len(members) < 2 else max(1, round(len(members) * test_fraction))
        order = rng.permutation(len(members))
        test = set(order[:n_test].tolist())
        for k, s in enumerate(members):
            out["test" if k in test else "train"].append(s)
    return out


def _fit(im: Image.Image, min_side: int) -> Image.Image:
    """Integer-factor box reduction that keeps the shorter side >= ``min_side`` (cheap, for huge images)."""
    factor = max(1, min(im.size) // min_side)
    return im.reduce(factor) if factor > 1 else im


def load_backgrounds(image_size: int, gnome: bool, gnome_dir: Path) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) pairs: scikit-image's bundled photographs, then the non-flat gnome rasters."""
    import skimage.data

    min_side = max(256, 4 * image_size)
    out = []
    for name in SKIMAGE_PHOTOS:
        arr = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            arr = arr[0]
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        out.append((f"skimage:{name}", _fit(Image.fromarray(np.ascontiguousarray(arr[:, :, :3])), min_side)))
    if gnome:
        if not gnome_dir.is_dir():
            raise SSLabError(
                f"gnome backgrounds not found at {gnome_dir}; {INSTALL_HINT} (or set data.gnome=false)"
            )
        for path in sorted(gnome_dir.iterdir()):
            if path.suffix.lower() not in RASTER_SUFFIXES:
                continue
            with Image.open(path) as im:
                im = _fit(im.convert("RGB"), min_side)
            if np.asarray(im.reduce(max(1, min(im.size) // 64))).std() < 8.0:  # flat colour (vnc-*.webp)
                continue
            out.append((f"gnome:{path.name}", im))
    return out


class StampCache:
    """Cut-outs decoded on first use: RGBA, cropped to the alpha bounding box, premultiplied ("RGBa"),
    box-reduced so the longer side stays >= ``min_side``. Stamps with empty alpha map to None."""

    def __init__(self, stamps_dir: Path, min_side: int) -> None:
        self.stamps_dir, self.min_side, self._cache = stamps_dir, min_side, {}

    def __call__(self, stamp: Stamp) -> Image.Image | None:
        if stamp.path not in self._cache:
            with Image.open(self.stamps_dir / stamp.path) as im:
                im = im.convert("RGBA")
            box = im.getchannel("A").getbbox()
            if box is None:
                self._cache[stamp.path] = None
            else:
                im = im.crop(box)
                factor = max(1, max(im.size) // self.min_side)
                im = im.convert("RGBa")
                self._cache[stamp.path] = im.reduce(factor) if factor > 1 else im
        return self._cache[stamp.path]


# -- composition ------------------------------------------------------------------------------------------
def paste(
    canvas: np.ndarray, visible: list[np.ndarray], rgba: np.ndarray, x: int, y: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Alpha-composite a premultiplied float (h, w, 4) cut-out (values in [0, 1]) at (x, y) "over" the
    float (S, S, 3) canvas (Porter & Duff, 1984: out = c_src + (1 - a_src) * c_dst), and return the new canvas
    and the visible masks: the earlier masks minus the new object's (alpha >= 0.5) pixels, then its own."""
    h, w = rgba.shape[:2]
    own = np.zeros(canvas.shape[:2], dtype=bool)
    own[y : y + h, x : x + w] = rgba[:, :, 3] >= 0.5
    out = canvas.copy()
    region = out[y : y + h, x : x + w]
    out[y : y + h, x : x + w] = rgba[:, :, :3] * 255.0 + (1.0 - rgba[:, :, 3:]) * region
    return out, [m & ~own for m in visible] + [own]


def _render(cutout: Image.Image, long_side: int, flip: bool) -> np.ndarray:
    """Resize the premultiplied cut-out so its longer side is ``long_side``; float (h, w, 4) in [0, 1]."""
    w, h = cutout.size
    s = long_side / max(w, h)
    im = cutout.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[:, ::-1] if flip else arr


def _background(
    rng: np.random.Generator, backgrounds: list[tuple[str, Image.Image]], size: int
) -> np.ndarray:
    """A random square crop (35-100% of the shorter side), resized to size x size, maybe mirrored."""
    _, im = backgrounds[int(rng.integers(len(backgrounds)))]
    w, h = im.size
    side = rng.uniform(0.35, 1.0) * min(w, h)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    arr = np.asarray(im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side)), np.float32)
    return arr[:, ::-1] if rng.random() < 0.5 else arr


def compose_image(
    rng: np.random.Generator,
    spec: BuildSpec,
    backgrounds: list[tuple[str, Image.Image]],
    by_category: list[list[Stamp]],
    cutouts: StampCache,
) -> tuple[np.ndarray, list[Stamp], list[np.ndarray]]:
    """One image: uint8 (S, S, 3), the pasted stamps in paste order, and their visible bool masks.

    Objects are drawn category-uniformly, then uniformly within the category, so every category is pasted
    about equally often (tuxpaint's "symbols" alone holds 247 of the 785 captioned stamps)."""
    size = spec.image_size
    canvas = _background(rng, backgrounds, size)
    min_px = max(4, round(spec.min_area * size * size))
    placed: list[Stamp] = []
    visible: list[np.ndarray] = []
    full: list[int] = []
    n_objects = int(rng.integers(1, spec.max_objects + 1))
    for k in range(n_objects):
        for _ in range(spec.tries if k else 10 * spec.tries):  # the first object must land
            group = by_category[int(rng.integers(len(by_category)))]
            stamp = group[int(rng.integers(len(group)))]
            cutout = cutouts(stamp)
            long_side = max(2, round(rng.uniform(*spec.scale) * size))
            flip = bool(rng.random() < 0.5)
            if cutout is None:
                continue
            rgba = _render(cutout, long_side, flip)
            h, w = rgba.shape[:2]
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            new_canvas, new_visible = paste(canvas, visible, rgba, x, y)
            areas = [int(m.sum()) for m in new_visible]
            need = [max(min_px, spec.min_visible * a) for a in [*full, areas[-1]]]
            if all(a >= n for a, n in zip(areas, need, strict=True)):
                canvas, visible = new_canvas, new_visible
                placed.append(stamp)
                full.append(areas[-1])
                break
        else:
            if k == 0:
                raise SSLabError(
                    "could not place any object in an image: the stamps are too thin for min_area"
                )
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), placed, visible


# -- writing ----------------------------------------------------------------------------------------------
def annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int, stamp: Stamp) -> dict:
    """COCO instance: RLE (pycocotools, counts as str), its area, and its tight xywh box."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_utils.area(rle))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": area,
        "iscrowd": 0,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
        "caption": stamp.caption,
        "phrase": stamp.phrase,
        "stamp": stamp.path,
    }


def _progress(enabled: bool, total: int):
    """A started rich progress bar and its task id, or (None, None)."""
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("stamps"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar.start()
    return bar, bar.add_task("build", total=total)


def write_dataset(out: Path, spec: BuildSpec, stamps_dir: Path, gnome_dir: Path, progress: bool) -> dict:
    """Write the dataset into the (new, empty) directory ``out``; returns the meta dict (``build`` is the
    entry: it writes beside ``out`` and renames, and holds the defaults)."""
    stamps = list_stamps(stamps_dir)
    categories = sorted({s.category for s in stamps})
    cat_id = {name: k + 1 for k, name in enumerate(categories)}
    splits = split_stamps(stamps, spec.seed, spec.test_fraction)
    backgrounds = load_backgrounds(spec.image_size, spec.gnome, gnome_dir)
    cutouts = StampCache(stamps_dir, min_side=2 * max(2, round(spec.scale[1] * spec.image_size)))
    counts = {"train": spec.num_train, "test": spec.num_test}
    bar, task = _progress(progress, spec.num_train + spec.num_test)
    meta_counts = {}
    try:
        for split_code, split in enumerate(SPLITS):
            groups = [[s for s in splits[split] if s.category == c] for c in categories]
            groups = [g for g in groups if g]
            (out / "images" / split).mkdir(parents=True)
            images, anns, labels = [], [], Counter()
            for i in range(counts[split]):
                rng = np.random.default_rng([spec.seed, split_code, i])
                pixels, placed, visible = compose_image(rng, spec, backgrounds, groups, cutouts)
                file_name = f"images/{split}/{i:06d}.png"
                Image.fromarray(pixels).save(out / file_name, format="PNG", compress_level=1)
                by_size = sorted(
                    range(len(placed)), key=lambda j: -int(visible[j].sum())
                )  # stable: ties keep order
                labels[placed[by_size[0]].category] += 1
                caption = compose_caption([placed[j].phrase for j in by_size])
                images.append(
                    {
                        "id": i + 1,
                        "file_name": file_name,
                        "width": spec.image_size,
                        "height": spec.image_size,
                        "caption": caption,
                    }
                )
                for stamp, mask in zip(placed, visible, strict=True):
                    anns.append(annotation(mask, len(anns) + 1, i + 1, cat_id[stamp.category], stamp))
                if bar is not None:
                    bar.advance(task)
            coco = {
                "info": {"description": "sslab stamps", "version": FORMAT_VERSION, "split": split},
                "images": images,
                "annotations": anns,
                "categories": [{"id": cat_id[c], "name": c, "supercategory": "object"} for c in categories],
            }
            (out / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
            meta_counts[split] = {
                "images": len(images),
                "instances": len(anns),
                "stamps": len(splits[split]),
                "instances_per_category": dict(
                    sorted(Counter(a["stamp"].split("/")[0] for a in anns).items())
                ),
                "labels_per_category": dict(sorted(labels.items())),
            }
    finally:
        if bar is not None:
            bar.stop()
    meta = {
        "format": FORMAT_VERSION,
        "spec": dataclasses.asdict(spec),
        "stamps_dir": str(stamps_dir),
        "categories": categories,
        "backgrounds": [name for name, _ in backgrounds],
        "counts": meta_counts,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def build(
    out: Path,
    spec: BuildSpec,
    stamps_dir: Path = STAMPS_DIR,
    gnome_dir: Path = GNOME_DIR,
    progress: bool = False,
) -> Path:
    """Build into a temporary sibling directory and rename it to ``out`` at the end, so a killed build never
    leaves a half dataset; if another process finished ``out`` first, its copy is kept."""
    out = Path(out)
    if out.exists():
        raise SSLabError(f"{out} already exists; delete it or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SSLabError(
            f"cannot create {out.parent} ({e.strerror}); point data.root / --out somewhere writable"
        ) from e
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_dataset(tmp, spec, stamps_dir, gnome_dir, progress)
        os.rename(tmp, out)
    except OSError:
        if (out / "meta.json").is_file():  # a concurrent build (another rank) won the rename
            return out
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="new directory to write")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--test", type=int, default=500, help="test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gnome", action="store_true", help="scikit-image photographs only")
    p.add_argument("--stamps-dir", type=Path, default=STAMPS_DIR)
    p.add_argument("--gnome-dir", type=Path, default=GNOME_DIR)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    spec = BuildSpec(
        image_size=a.image_size, num_train=a.train, num_test=a.test, seed=a.seed, gnome=not a.no_gnome
    )
    start = time.perf_counter()
    try:
        build(a.out, spec, a.stamps_dir, a.gnome_dir, progress=not a.quiet)
    except SSLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = json.loads((a.out / "meta.json").read_text())
    for split, c in meta["counts"].items():
        print(f"{split}: {c['images']} images, {c['instances']} instances, {c['stamps']} stamps")
    print(
        f"{len(meta['categories'])} categories, {len(meta['backgrounds'])} backgrounds; built in "
        f"{time.perf_counter() - start:.1f} s -> {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
