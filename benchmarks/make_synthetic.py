"""A synthetic MNIST-like dataset ``K`` times the size of Fashion-MNIST's training split, as the four standard gz IDX
files, for scale benchmarks.

The training split is ``K`` copies of Fashion-MNIST's 60,000 images: copy 0 as is, copy ``j`` shifted by a small
(dy, dx) that depends on ``j`` (wrapping round; Fashion-MNIST's borders are background), mirrored left-right every
other cycle of shifts, with the labels tiled.  The test split is Fashion-MNIST's, copied.  Files are streamed: the
IDX header first, then chunks of rows through ``gzip.GzipFile(compresslevel=1)``, so memory stays at the source
arrays plus one chunk whatever ``K``.  Every file appears under its final name only when complete
(:func:`spark_mnist.fs.replacing`), and ``_synthetic.json`` (written last) marks a complete directory.

Usage: ``python -m benchmarks.make_synthetic --scale 10 --out /tmp/spark-mnist-bench/synthetic-x10``
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
from typing import Iterator

import numpy as np

from benchmarks.common import (FASHION_MNIST_DIR, IDX_FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS,
                               log, parse_idx_files, quiet_logs, stopwatch)
from spark_mnist.errors import invalid
from spark_mnist.fs import replacing

MARKER = "_synthetic.json"
CHUNK_ROWS = 10_000
# Shifts of the copies after the first: every (dy, dx) in [-2, 2]^2 but (0, 0).
SHIFTS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]


def perturb(images: np.ndarray, copy: int) -> np.ndarray:
    """Copy ``copy`` of ``images`` (n, H, W): the images themselves for copy 0, else shifted (and mirrored every
    other cycle of :data:`SHIFTS`)."""
    if copy == 0:
        return images
    dy, dx = SHIFTS[(copy - 1) % len(SHIFTS)]
    out = np.roll(images, (dy, dx), axis=(1, 2))
    if ((copy - 1) // len(SHIFTS)) % 2:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def write_idx_stream(path: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterator[np.ndarray]) -> int:
    """Write a gz IDX file of ``shape`` from ``chunks`` (consecutive row blocks), atomically.  Returns the rows
    written.

    Raises:
        ValueError: the chunks do not add up to ``shape``.
    """
    from spark_mnist.formats.idx import CODE_BY_KIND, DTYPE_BY_CODE, IdxHeader

    big_endian = DTYPE_BY_CODE[CODE_BY_KIND[(np.dtype(dtype).kind, np.dtype(dtype).itemsize)]]
    rows = 0
    with replacing(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as out:
            out.write(IdxHeader(big_endian, tuple(shape)).encode())
            for chunk in chunks:
                if tuple(chunk.shape[1:]) != tuple(shape[1:]):
                    raise ValueError(f"{path}: chunk of shape {chunk.shape}, expected (n, {shape[1:]})")
                out.write(np.ascontiguousarray(chunk, dtype=big_endian).data)
                rows += len(chunk)
        if rows != shape[0]:
            raise ValueError(f"{path}: wrote {rows} rows, the header says {shape[0]}")
    return rows


def image_chunks(images: np.ndarray, scale: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """The ``scale`` copies of ``images`` (n, H, W) uint8 (:func:`perturb`), in blocks of at most ``chunk_rows``."""
    for copy in range(scale):
        for lo in range(0, len(images), chunk_rows):
            yield perturb(images[lo:lo + chunk_rows], copy)


def label_chunks(labels: np.ndarray, scale: int) -> Iterator[np.ndarray]:
    """``labels`` (n,) ``scale`` times, to match :func:`image_chunks`."""
    for _ in range(scale):
        yield labels


def is_complete(out: str, scale: int) -> bool:
    """Whether ``out`` holds a complete synthetic dataset of ``scale``."""
    try:
        with open(os.path.join(out, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return marker.get("scale") == scale and all(os.path.exists(os.path.join(out, n)) for n in IDX_FILES)


def make_synthetic(scale: int, out: str, source: str = FASHION_MNIST_DIR, chunk_rows: int = CHUNK_ROWS,
                   rows: int | None = None) -> dict:
    """Write the synthetic dataset of ``scale`` into ``out`` (replacing what is there), from the first ``rows``
    training images of ``source`` (default all; fewer make a quick smoke-test dataset).  Returns its marker:
    scale, rows, bytes of each file, seconds.

    Raises:
        ValueError: ``scale`` below 1.
    """
    if scale < 1:
        raise invalid("scale", scale, "at least 1")
    os.makedirs(out, exist_ok=True)
    marker_path = os.path.join(out, MARKER)
    if os.path.exists(marker_path):
        os.remove(marker_path)
    with stopwatch() as t:
        arrays = parse_idx_files(source, (TRAIN_IMAGES, TRAIN_LABELS))
        images, labels = arrays[TRAIN_IMAGES][:rows], arrays[TRAIN_LABELS][:rows]
        written = write_idx_stream(os.path.join(out, TRAIN_IMAGES), images.dtype, (scale * len(images),
                                *images.shape[1:]), image_chunks(images, scale, chunk_rows))
        write_idx_stream(os.path.join(out, TRAIN_LABELS), labels.dtype, (scale * len(labels),),
                         label_chunks(labels, scale))
        for name in (TEST_IMAGES, TEST_LABELS):
            shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    marker = {"scale": scale, "train_rows": written, "source": source, "seconds": round(t["seconds"], 2),
              "bytes": {name: os.path.getsize(os.path.join(out, name)) for name in IDX_FILES}}
    with replacing(marker_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
    return marker


def ensure_synthetic(scale: int, out: str, source: str = FASHION_MNIST_DIR) -> tuple[dict, bool]:
    """The synthetic dataset of ``scale`` in ``out``, generated if missing.  Returns (marker, generated now)."""
    if is_complete(out, scale):
        with open(os.path.join(out, MARKER), encoding="utf-8") as f:
            return json.load(f), False
    log.info("generating the x%d synthetic dataset in %s", scale, out)
    return make_synthetic(scale, out, source), True


def main(argv: list[str] | None = None) -> int:
    """The command line (usage in the module docstring): prints the marker as one JSON line, returns 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.make_synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, required=True, help="K: K x 60,000 training images")
    parser.add_argument("--out", required=True, help="directory for the 4 gz IDX files")
    parser.add_argument("--source", default=FASHION_MNIST_DIR, help="Fashion-MNIST's gz IDX files")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows per write (memory bound)")
    args = parser.parse_args(argv)
    if args.scale < 1 or args.chunk_rows < 1:
        parser.error("--scale and --chunk-rows must be at least 1")
    quiet_logs()
    marker = make_synthetic(args.scale, args.out, args.source, args.chunk_rows)
    print(json.dumps(marker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
