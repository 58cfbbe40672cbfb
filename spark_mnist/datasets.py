"""The dataset registry: the MNIST family as data, not code.

Every dataset is a :class:`DatasetSpec`: the four standard IDX files, class names, image shape, label range, the
payload sha256 of each file where known (sha256 of the decompressed file, independent of the gzip wrapper), and
mirrors, and where other libraries keep copies (torchvision's folder name, Keras' file).  A new MNIST-like dataset
is a new entry in :func:`registry`.

Sources: MNIST page (LeCun, Cortes, Burges); Fashion-MNIST (Xiao, Rasul, Vollgraf, Zalando Research); KMNIST
(Clanuwat et al., ROIS-DS CODH); EMNIST (Cohen, Afshar, Tapson, van Schaik, NIST).  Payload hashes of MNIST and
Fashion-MNIST are the ones in shared/data/README.md.  torchvision folder names are its dataset class names
(``torchvision.datasets.MNIST`` keeps files under ``<root>/MNIST/raw``); Keras ships MNIST alone as an npz
(``keras.datasets.mnist.load_data`` caches ``~/.keras/datasets/mnist.npz``).
"""

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import numpy as np

from spark_mnist.errors import DatasetMismatchError, InputError, check_choice

__all__ = ["IMAGES", "LABELS", "SPLITS", "DIGITS", "DatasetFile", "DatasetSpec", "registry", "get_dataset",
           "validate_split", "hash_mismatch_message", "upright"]  # fmt: skip

SPLITS = ("train", "test")
IMAGES, LABELS = "images", "labels"


class DatasetFile(NamedTuple):
    """One IDX file of a dataset: its standard name and, where known, the sha256 of its decompressed payload."""

    name: str
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """An MNIST-like dataset: uint8 images of ``image_shape`` with integer labels in ``[0, num_classes)``.

    ``files[split][IMAGES|LABELS]`` names the gz IDX files; ``transposed`` marks images stored column-major
    (EMNIST), which readers return upright; ``mirrors`` are base URLs tried in order by downloads;
    ``torchvision_folder`` is the folder torchvision's class for this dataset keeps its files in
    (``<root>/<folder>/raw/``), ``None`` where torchvision has none; ``keras_file`` the npz Keras caches it as
    (:mod:`spark_mnist.formats.keras_npz`), ``None`` where Keras has no npz of it.
    """

    name: str
    files: Mapping[str, Mapping[str, DatasetFile]]
    classes: tuple[str, ...]
    # (mean, std) of the training split's pixels / 255, which models.normalize subtracts and divides by.
    normalization: tuple[float, float]
    image_shape: tuple[int, int] = (28, 28)
    split_sizes: Mapping[str, int] = field(default_factory=dict)
    mirrors: tuple[str, ...] = ()
    transposed: bool = False
    torchvision_folder: str | None = None
    keras_file: str | None = None

    @property
    def num_classes(self) -> int:
        """How many classes, so labels lie in ``[0, num_classes)``."""
        return len(self.classes)

    def file(self, split: str, kind: str) -> DatasetFile:
        """The :class:`DatasetFile` for ``split`` ('train'|'test') and ``kind`` ('images'|'labels')."""
        return self.files[check_choice("split", split, self.files)][check_choice("kind", kind, (IMAGES, LABELS))]

    def all_files(self) -> list[DatasetFile]:
        """The four files: train images, train labels, test images, test labels."""
        return [self.files[split][kind] for split in SPLITS for kind in (IMAGES, LABELS)]


def _files(dataset: str, hashes: Mapping[str, str]) -> dict[str, dict[str, DatasetFile]]:
    """The four gz IDX files of ``dataset`` by split and kind: the MNIST page's names (``train-images-idx3-ubyte.gz``,
    ``t10k-labels-idx1-ubyte.gz``, ...), or EMNIST's (``emnist-<split>-train-images-idx3-ubyte.gz``, ...), each with
    its payload sha256 from ``hashes`` (by ``<dataset>/<file name>``) where known."""
    # EMNIST's files are named after the dataset (emnist-<split>-train-...).
    stems = (
        {s: f"{dataset}-{s}" for s in SPLITS} if dataset.startswith("emnist-") else {"train": "train", "test": "t10k"}
    )
    kinds = {IMAGES: "idx3", LABELS: "idx1"}  # the IDX number of dimensions in the name
    names = {s: {k: f"{stem}-{k}-{idx}-ubyte.gz" for k, idx in kinds.items()} for s, stem in stems.items()}
    return {s: {k: DatasetFile(n, hashes.get(f"{dataset}/{n}")) for k, n in kind.items()} for s, kind in names.items()}


DIGITS = tuple("0123456789")
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
LOWER = tuple("abcdefghijklmnopqrstuvwxyz")
# EMNIST balanced/bymerge merge the lowercase letters that look like their uppercase (c i j k l m o p s u v w x y z).
MERGED_LOWER = tuple(c for c in LOWER if c not in "cijklmopsuvwxyz")
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def registry() -> dict[str, DatasetSpec]:
    """All known datasets by name.  Built on each call: no module-level mutable state."""
    emnist = (0.1751, 0.3332)  # one pair for every EMNIST split: computed from the training pixels / 255
    # name: classes, (mean, std) of the training split's pixels / 255, train rows, test rows
    table = {
        "mnist": (DIGITS, (0.1307, 0.3081), 60_000, 10_000),  # pytorch/examples mnist/main.py's Normalize
        "fashion-mnist": (FASHION, (0.2860, 0.3530), 60_000, 10_000),  # computed (rechecked on the 60,000)
        # computed from the training pixels / 255
        "kmnist": (("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), (0.1918, 0.3483), 60_000, 10_000),
        "emnist-balanced": (DIGITS + LETTERS + MERGED_LOWER, emnist, 112_800, 18_800),
        "emnist-byclass": (DIGITS + LETTERS + LOWER, emnist, 697_932, 116_323),
        "emnist-bymerge": (DIGITS + LETTERS + MERGED_LOWER, emnist, 697_932, 116_323),
        "emnist-digits": (DIGITS, emnist, 240_000, 40_000),
        "emnist-letters": (("N/A",) + LETTERS, emnist, 124_800, 20_800),  # labels run 1..26 (0 is unused, "N/A")
        "emnist-mnist": (DIGITS, emnist, 60_000, 10_000),
    }
    # Payload sha256 (of the decompressed file) by "<dataset>/<file name>", as shared/data/README.md lists them.
    hashes = {
        "mnist/t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "mnist/t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "mnist/train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "fashion-mnist/train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "fashion-mnist/train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "fashion-mnist/t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "fashion-mnist/t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }
    mirrors = {
        "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        "kmnist": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    }
    folders = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
    specs = {}
    for name, (classes, normalization, train, test) in table.items():
        specs[name] = DatasetSpec(
            name,
            _files(name, hashes),
            classes,
            normalization,
            split_sizes={"train": train, "test": test},
            mirrors=mirrors.get(name, ("https://biometrics.nist.gov/cs_links/EMNIST/",)),
            transposed=name.startswith("emnist-"),
            torchvision_folder=folders.get(name, "EMNIST"),
            keras_file="mnist.npz" if name == "mnist" else None,
        )
    return specs


def get_dataset(name: str) -> DatasetSpec:
    """The registry entry for ``name``.

    Raises:
        InputError: an unknown name (the message lists the known ones).
    """
    specs = registry()
    return specs[check_choice("dataset", name, specs, InputError)]


def validate_split(spec: DatasetSpec, images: Any, labels: np.ndarray, images_name: str, labels_name: str) -> None:
    """Check that ``images`` (N, H, W) uint8 and ``labels`` (N,) form one split of ``spec``.

    ``images`` is the array, or anything with its ``shape`` and ``dtype`` (an IDX header,
    :class:`spark_mnist.formats.idx.IdxHeader`), so a streamed images file is checked before its data is read.

    Raises:
        DatasetMismatchError: image shape other than the dataset's, a non-uint8 dtype, labels that are not 1-d,
            images and labels of different counts, labels out of ``[0, num_classes)``.
    """
    shape = tuple(images.shape)
    if len(shape) != 3 or shape[1:] != spec.image_shape:
        raise DatasetMismatchError(
            f"{images_name}: image shape {shape[1:] if len(shape) == 3 else shape} "
            f"is not {spec.name}'s: expected (N, {spec.image_shape[0]}, {spec.image_shape[1]})"
        )
    for array, array_name, what in ((images, images_name, "pixels"), (labels, labels_name, "labels")):
        if array.dtype != np.uint8:
            raise DatasetMismatchError(f"{array_name}: dtype {array.dtype}: expected uint8 {what}")
    if labels.ndim != 1:
        raise DatasetMismatchError(f"{labels_name}: labels of shape {labels.shape}: expected one dimension (N,)")
    if shape[0] != len(labels):
        raise DatasetMismatchError(
            f"{labels_name}: {len(labels)} labels for {shape[0]} images in {images_name}: counts must match"
        )
    if len(labels) and int(labels.max()) >= spec.num_classes:
        bad = int(np.argmax(labels >= spec.num_classes))
        raise DatasetMismatchError(
            f"{labels_name}: label {int(labels[bad])} at index {bad} is out of {spec.name}'s range "
            f"0..{spec.num_classes - 1}"
        )


def hash_mismatch_message(dataset: str, where: str, found: str, expected: str) -> str:
    """The one wording of a payload whose sha256 is not the registry's, for verify, download and ingest:
    ``{where}: payload sha256 {found} differs from {dataset}'s published {expected}`` (hex digests of the
    decompressed file, header and data)."""
    return f"{where}: payload sha256 {found} differs from {dataset}'s published {expected}"


def upright(spec: DatasetSpec, images: np.ndarray) -> np.ndarray:
    """Images of shape (N, H, W) as they should be viewed: EMNIST's column-major images are transposed back."""
    return np.ascontiguousarray(images.transpose(0, 2, 1)) if spec.transposed else images
