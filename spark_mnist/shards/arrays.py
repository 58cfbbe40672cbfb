"""Numpy arrays out of a dataset and into one, with no Spark and no torch.

Keras-style access: ``load_data(path)`` -> ``((x_train, y_train), (x_test, y_test))`` as numpy arrays.

For users coming from ``keras.datasets.mnist.load_data()``.  Reads, with the same validation as ingest, any of:
a directory of the four gz IDX files, an ingested Parquet dataset (``OUT`` with ``_manifest.json``, on a local or
FUSE path or an object store: :func:`spark_mnist.shards.contract.open_dataset`), or a Keras ``mnist.npz``.
:func:`write_local_dataset` writes arrays as an ingested dataset, by ingest's own writer and commit.
"""

import os

import numpy as np

from spark_mnist.datasets import IMAGES, LABELS, SPLITS, DatasetSpec, get_dataset, upright, validate_split
from spark_mnist.errors import SourceError
from spark_mnist.formats.idx import parse_idx
from spark_mnist.formats.keras_npz import load_keras_npz
from spark_mnist.paths import normalize_uri
from spark_mnist.shards import contract
from spark_mnist.shards.commit import publish, writing
from spark_mnist.shards.parquet import plan_row_groups, read_rows, total_rows, write_shard

__all__ = ["load_data", "split_arrays", "write_local_dataset"]

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def load_data(path: str | os.PathLike, dataset: str = "mnist") -> Arrays:
    """Load a dataset the way ``keras.datasets.mnist.load_data()`` returns it.

    Args:
        path: a local (or ``/dbfs/``, ``/Volumes/``, ``file:/``) directory of the four gz IDX files or Keras
            ``mnist.npz``, or an ingested dataset anywhere :func:`~spark_mnist.shards.contract.open_dataset` reads
            one (local, FUSE, ``s3://``, ``gs://``, ``abfss://``).
        dataset: registry name, used for file names and checks (an ingested dataset names its own).

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images uint8 of shape (N, H, W) (28 x 28 pixels for the
        MNIST family), upright (EMNIST is transposed back), labels uint8 of shape (N,) in ``[0, num_classes)``.

    Raises:
        SourceError: a local path that does not exist.
        DatasetNotFoundError: a URI with no complete ingested dataset (as :func:`open_dataset`).
        IdxFormatError, DatasetMismatchError, InputError: as ingest, for the same defects.
    """
    local = normalize_uri(path).os_path
    if local is not None and not os.path.exists(local):
        raise SourceError(f"{path}: not found (load_data reads local, /dbfs/ or /Volumes/ paths)")
    if local is not None and local.endswith(".npz"):
        loaded = load_keras_npz(local, get_dataset(dataset))  # checked as ingest checks IDX files
        return loaded["train"], loaded["test"]
    if local is None or os.path.exists(os.path.join(local, contract.MANIFEST_NAME)):  # object stores: ingested only
        opened = contract.open_dataset(os.fspath(path) if local is None else local)
        return split_arrays(opened, "train"), split_arrays(opened, "test")
    spec = get_dataset(dataset)
    result = []
    for split in SPLITS:
        paths = {kind: os.path.join(local, spec.file(split, kind).name) for kind in (IMAGES, LABELS)}
        missing = [p for p in paths.values() if not os.path.exists(p)]
        if missing:
            raise SourceError(f"{', '.join(missing)}: file not found")
        images, labels = parse_idx(paths[IMAGES]).array, parse_idx(paths[LABELS]).array
        validate_split(spec, images, labels, paths[IMAGES], paths[LABELS])
        result.append((upright(spec, images), labels))
    return result[0], result[1]


def split_arrays(dataset: contract.Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of an opened ingested dataset, whole, in index order (the order its shards hold):
    ``images`` uint8 (N, H, W) and ``labels`` uint8 (N,), checked against the registry entry of the manifest's
    dataset.

    Raises:
        DatasetMismatchError: images or labels that do not fit the registry entry (a damaged dataset).
    """
    shape = dataset.image_shape
    plan = plan_row_groups(dataset.files(split))
    _, pixels, labels = read_rows(plan, 0, total_rows(plan), int(np.prod(shape)))
    images, labels = pixels.reshape(-1, *shape), labels.astype(np.uint8)
    where = f"{dataset.location.shown}/{split}"
    validate_split(get_dataset(dataset.dataset), images, labels, where, where)
    return images, labels


def write_local_dataset(
    output: str | os.PathLike,
    spec: DatasetSpec,
    arrays: dict[str, tuple],
    *,
    num_shards: int = 1,
    rows_per_group: int | None = None,
) -> contract.Manifest:
    """Write ``arrays`` (``{split: (images (n, H, W) uint8, labels (n,))}``) as a dataset of ``spec`` at ``output``
    (any spelling :func:`spark_mnist.paths.normalize_uri` accepts, object stores included) without Spark: the same
    files and protocol as ingest, ``num_shards`` contiguous shards per split under a new generation by the
    task-side writer, then :func:`~spark_mnist.shards.commit.publish`.  For the test kit
    (:mod:`spark_mnist.testing`), small tools and the store tests.  Where: one process.

    Args:
        rows_per_group: rows per Parquet row group; default about
            :data:`~spark_mnist.shards.contract.ROW_GROUP_BYTES` of images.
    Returns:
        The manifest published (as :func:`~spark_mnist.shards.commit.publish`).
    Raises:
        OSError: as :func:`~spark_mnist.shards.commit.publish`, or a shard could not be written (the generation is
            then discarded).
    """
    out = normalize_uri(output)
    rows_per_group = rows_per_group or max(1, contract.ROW_GROUP_BYTES // int(np.prod(spec.image_shape)))
    with writing(out) as ingest:
        files = []
        for name, (images, labels) in arrays.items():
            bounds = contract.shard_bounds(len(labels), num_shards)
            for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                path = contract.shard_path(ingest.generation, name, k)
                size = write_shard(out.display, path, images[lo:hi], labels[lo:hi], int(lo), rows_per_group)
                files.append(contract.ShardFile(path, size, int(hi - lo)))
        return publish(out, ingest, spec, {name: labels for name, (_, labels) in arrays.items()}, files, {})
