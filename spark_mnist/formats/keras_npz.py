"""Keras' ``mnist.npz`` (``~/.keras/datasets/mnist.npz``, what ``keras.datasets.mnist.load_data()`` downloads) as
MNIST IDX files, so an existing Keras cache feeds the same ingest path as the published gz files.

The archive holds four arrays: ``x_train`` (60000, 28, 28) uint8, ``y_train`` (60000,) uint8, ``x_test``
(10000, 28, 28) uint8, ``y_test`` (10000,) uint8 -- the MNIST data unchanged, so the IDX files written from it carry
the published payload sha256s.  It is read with ``allow_pickle=False``: an archive holding pickled objects is refused
rather than executed.
"""

import os
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from spark_mnist.datasets import DatasetSpec, get_dataset, validate_split
from spark_mnist.errors import InputError
from spark_mnist.formats.idx import write_idx

__all__ = ["load_keras_npz", "npz_to_idx_dir"]

KERAS_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}


def load_keras_npz(
    source: str | os.PathLike | BinaryIO, spec: DatasetSpec | None = None, *, name: str | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a Keras ``mnist.npz`` with ``np.load(source, allow_pickle=False)`` and check each split as one of
    ``spec``'s (:func:`spark_mnist.datasets.validate_split`, the check ingest applies to IDX files).

    Args:
        source: the ``.npz`` file (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``; Keras' layout), as a
            path or an open binary file (e.g. the bytes Spark's ``binaryFile`` source read, in ``io.BytesIO``).
        spec: the dataset the arrays must form (image shape in pixels, label range); default the registry's
            ``mnist``.
        name: how errors name the file; defaults to the path.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}`` with images uint8 of shape (N, H, W) and labels
        uint8 of shape (N,) in ``[0, spec.num_classes)``, the same N within a split.

    Raises:
        InputError: naming the file: not a readable ``.npz`` archive, pickled (object) content, a missing key,
            labels not 1-d integers in 0..255.
        DatasetMismatchError (an InputError): naming the file and key (``<file>[x_train]``): images not (N, H, W)
            of ``spec.image_shape`` or not uint8, image and label counts that differ, labels out of ``spec``'s range.
    """
    spec = spec or get_dataset("mnist")
    path = Path(name or ("<npz>" if hasattr(source, "read") else os.fspath(source)))
    try:
        loaded = np.load(source, allow_pickle=False)
    except FileNotFoundError as e:
        raise InputError(f"{path}: file not found (expected a Keras mnist.npz)") from e
    except ValueError as e:  # np.load falls back to pickle for unknown content, which allow_pickle=False refuses
        raise InputError(f"{path}: not an .npz archive (or pickled content, refused): {e}") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz archive: {e}") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: a single .npy array, not an .npz archive with x_train, y_train, x_test, y_test")
    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with loaded:
        if missing := [key for keys in KERAS_KEYS.values() for key in keys if key not in loaded.files]:
            raise InputError(
                f"{path}: missing key(s) {', '.join(missing)}: expected x_train, y_train, x_test, "
                f"y_test (Keras' mnist.npz); found {', '.join(loaded.files) or 'none'}"
            )
        for split, (x_key, y_key) in KERAS_KEYS.items():
            images, labels = (_member(loaded, path, key) for key in (x_key, y_key))
            # What only an npz can get wrong (labels of any integer dtype, which must fit uint8), then the check
            # ingest applies to IDX files.
            if labels.ndim != 1 or labels.dtype.kind not in "ui":
                raise InputError(
                    f"{path}: {y_key} has shape {labels.shape} and dtype {labels.dtype}: expected (N,) integers"
                )
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 255):
                raise InputError(f"{path}: {y_key} has labels outside 0..255: expected uint8 class indices")
            labels = labels.astype(np.uint8, copy=False)
            validate_split(spec, images, labels, f"{path}[{x_key}]", f"{path}[{y_key}]")
            result[split] = (np.ascontiguousarray(images), labels)
    return result


def _member(loaded: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return loaded[key]
    except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise InputError(f"{path}: {key} holds pickled objects, refused (allow_pickle=False): {e}") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(f"{path}: {key} cannot be read from the archive: {e}") from e


def npz_to_idx_dir(npz_path: str | os.PathLike, out_dir: str | os.PathLike, *, spec: DatasetSpec) -> Path:
    """Write the four standard gz IDX files of ``spec`` from a Keras npz.

    Each file appears under its final name only when complete (:func:`spark_mnist.formats.idx.write_idx`).  Images are
    written (N, H, W) uint8 (IDX dtype code 0x08, 3 dimensions), labels (N,) uint8 (1 dimension), as on the MNIST
    page, so :func:`spark_mnist.tools.verify.verify_source` and ingest read ``out_dir`` like a download.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path` (created with its parents where missing).

    Raises:
        InputError: as :func:`load_keras_npz`.
    """
    arrays = load_keras_npz(npz_path, spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The files in all_files' order: train images, train labels, test images, test labels.
    for entry, array in zip(spec.all_files(), [*arrays["train"], *arrays["test"]]):
        write_idx(out / entry.name, array, compress=True)
    return out
