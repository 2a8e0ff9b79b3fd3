"""Place a real pretrained vision transformer (PP-OCRv6 text recognition) and real text-line inputs, offline.

The model is ``PP-OCRv6_rec_small.onnx``, the text-line recogniser that ships inside the PyPI wheel
``rapidocr`` (3.10; Apache-2.0 code, the model's licence is in the wheel's ``MODEL_LICENSES.md``): a
convolutional stem, two SVTR transformer blocks (hidden size 120, attention with ``MatMul`` weights
120x360 / 120x120, MLP 120x240 / 240x120) and a CTC head of 120 x 18710 characters; 5.27M parameters,
21 MB. Input ``x`` float32 ``[batch, 3, 48, width]`` (RGB, ``(pixel / 255 - 0.5) / 0.5``, right-padded
with zeros, as RapidOCR feeds it), output ``fetch_name_0`` float32 ``[batch, width / 8, 18710]``, the
per-time-step character probabilities. Its character list is the model's ``character`` metadata; it
is decoded with RapidOCR's own ``CTCLabelDecode`` (greedy CTC).

Inputs, all as RapidOCR's recogniser sees them (height 48, aspect kept, zero padding to ``WIDTH``):

* ``photo``: the 7 text lines of a real photograph of a printed book page, ``skimage/data/page.png``
  in the scikit-image wheel (read as a file, scikit-image is never imported). The line quadrilaterals
  are those RapidOCR's own PP-OCRv6 detector finds on it (fixed below, so this script does not depend
  on the detector); each is cut out with a perspective warp as RapidOCR does. Ground truth typed by
  hand from each crop (the last box leaves out the line's ``>>>`` prompt, so its truth does too).
* ``printed``: 200 printed lines of real English text: the first words (at most ``MAX_CHARS``
  characters, at a word boundary) of each of the 200 movie-review sentences in gensim's
  ``pang_lee_polarity.cor`` (in the gensim wheel, read as a file), rendered with the DejaVu and STIX
  fonts that ship in matplotlib's wheel, at 22-40 px, dark on a light ground, with a seeded mix of
  slight rotation, blur, sensor noise and JPEG compression. The images are synthetic; the text, and so
  the ground truth, is real.

Outputs (in ``--out-dir``, default ``models/build``):

* ``ppocr_rec.onnx``: the model, copied byte for byte from the wheel.
* ``ppocr_calibration.npz``: ``x`` float32 ``[120, 3, 48, WIDTH]``, 120 of the printed lines (seeded
  choice), for calibration and any search.
* ``ppocr_test.npz``: ``x`` float32 ``[87, 3, 48, WIDTH]``, the other 80 printed lines, then the 7
  photo lines: never used to choose anything.
* ``ppocr_calibration.json`` / ``ppocr_test.json``: per line ``{"text", "source"}`` in the same order.

Existing outputs are kept unless ``--force``. Requirements: ``rapidocr`` (and its ``opencv-python-headless``),
``gensim`` and ``matplotlib`` (data and font files only), ``scikit-image`` (the one photograph),
``pillow``, ``numpy``. Deterministic for given package versions.

Usage::

    python models/build_ppocr.py [--out-dir models/build] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "build"
MODEL = "ppocr_rec.onnx"
HEIGHT = 48
WIDTH = 832  # 17.3 x the height: the widest photo line (RapidOCR batches to the widest line's ratio)
MAX_CHARS = 32
CALIBRATION_LINES = 120
SEED = 0

# (quadrilateral as RapidOCR's PP-OCRv6 detector returns it on skimage/data/page.png, ground truth)
PHOTO_LINES: list[tuple[list[list[int]], str]] = [
    ([[3, 9], [296, 10], [295, 36], [3, 35]], "Region-based segmentation"),
    ([[2, 45], [379, 47], [379, 68], [2, 66]], "Let us first determine markers of the coins and the"),
    ([[1, 62], [380, 63], [380, 87], [1, 86]], "background. These markers are pixels that we can label"),
    ([[1, 79], [380, 81], [380, 105], [1, 104]], "unambiguously as either object or background. Here,"),
    ([[1, 95], [381, 97], [381, 124], [1, 122]], "the markers are found at the two extreme parts of the"),
    ([[4, 114], [173, 120], [173, 140], [3, 133]], "histogram of grey values:"),
    ([[38, 167], [243, 175], [242, 190], [37, 186]], "markers = np.zeros_like(coins)"),
]
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf")


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {name!r} is not installed: pip install 'onnx-arsvd[ppocr]'")
    return Path(spec.origin).parent


def normalise(rgb: np.ndarray) -> np.ndarray:
    """RapidOCR's ``resize_norm_img`` at ``WIDTH``: height 48, aspect kept (capped at WIDTH), zero padding."""
    import cv2

    h, w = rgb.shape[:2]
    resized_w = min(WIDTH, math.ceil(HEIGHT * w / h))
    resized = cv2.resize(rgb, (resized_w, HEIGHT)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :resized_w] = (resized - 0.5) / 0.5
    return out


def crop_quad(image: np.ndarray, quad: list[list[int]]) -> np.ndarray:
    """RapidOCR's ``get_rotate_crop_image``: perspective-warp a quadrilateral to an upright rectangle."""
    import cv2

    points = np.array(quad, dtype=np.float32)
    w = int(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    h = int(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(points, target)
    crop = cv2.warpPerspective(image, matrix, (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    if crop.shape[0] / crop.shape[1] >= 1.5:
        crop = np.rot90(crop)
    return crop


def photo_lines() -> list[tuple[np.ndarray, str]]:
    from PIL import Image

    page = np.asarray(Image.open(package_dir("skimage") / "data" / "page.png").convert("RGB"))
    return [(normalise(crop_quad(page, quad)), text) for quad, text in PHOTO_LINES]


def review_texts() -> list[str]:
    """The first words of each polarity sentence, lightly detokenised (``it 's`` stays as written)."""
    path = package_dir("gensim") / "test" / "test_data" / "pang_lee_polarity.cor"
    texts = []
    for line in path.read_text(encoding="cp1252").splitlines():
        words = line.split()[1:]  # drop __label__pos / __label__neg
        sentence = " ".join(words)
        for before, after in ((" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"), (" ?", "?"), (" !", "!")):
            sentence = sentence.replace(before, after)
        out = ""
        for word in sentence.split():
            if len(out) + 1 + len(word) > MAX_CHARS and out:
                break
            out = f"{out} {word}".strip()
        texts.append(out)
    return texts


def render(text: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    fonts = package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf"
    font = ImageFont.truetype(str(fonts / FONTS[rng.integers(len(FONTS))]), int(rng.integers(22, 41)))
    ground, ink = int(rng.integers(170, 256)), int(rng.integers(0, 90))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 16)), int(rng.integers(3, 10))
    image = Image.new("L", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), ground)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, fill=ink, font=font)
    angle = float(rng.uniform(-1.5, 1.5))
    image = image.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=ground)
    blur = float(rng.uniform(0.0, 1.2))
    if blur > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, rng.uniform(0.0, 10.0), (image.height, image.width))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(30, 90)))
        image = Image.open(io.BytesIO(buffer.getvalue()))
    return normalise(np.asarray(image.convert("RGB")))


def save(out_dir: Path, name: str, lines: list[tuple[np.ndarray, str, str]]) -> None:
    np.savez(out_dir / f"ppocr_{name}.npz", x=np.stack([x for x, _, _ in lines]))
    meta = [{"text": text, "source": source} for _, text, source in lines]
    (out_dir / f"ppocr_{name}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out_dir: Path, force: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODEL
    if force or not target.exists():
        shutil.copyfile(package_dir("rapidocr") / "models" / "PP-OCRv6_rec_small.onnx", target)
        print(f"wrote {target}")
    outputs = [out_dir / f"ppocr_{n}.{e}" for n in ("calibration", "test") for e in ("npz", "json")]
    if not force and all(path.exists() for path in outputs):
        print(f"kept the inputs in {out_dir} (--force rebuilds them)")
        return
    rng = np.random.default_rng(SEED)
    printed = [(render(text, rng), text, "printed") for text in review_texts()]
    order = rng.permutation(len(printed))
    calibration = [printed[i] for i in order[:CALIBRATION_LINES]]
    test = [printed[i] for i in order[CALIBRATION_LINES:]] + [(x, t, "photo") for x, t in photo_lines()]
    save(out_dir, "calibration", calibration)
    save(out_dir, "test", test)
    print(f"wrote {len(calibration)} calibration and {len(test)} test lines ({WIDTH} px wide) to {out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild outputs that exist")
    args = parser.parse_args(argv)
    build(args.out_dir, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
