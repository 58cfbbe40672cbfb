"""The dataset registry (spark_mnist.datasets): contents, lookups, split validation, EMNIST orientation.  No Spark."""

from __future__ import annotations

import re

import numpy as np
import pytest

from spark_mnist.datasets import (
    IMAGES,
    LABELS,
    SPLITS,
    DatasetFile,
    DatasetSpec,
    get_dataset,
    registry,
    upright,
    validate_split,
)
from spark_mnist.errors import DatasetMismatchError, InputError

STANDARD = ("mnist", "fashion-mnist", "kmnist")
EMNIST_SPLITS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")
EMNIST = tuple(f"emnist-{s}" for s in EMNIST_SPLITS)
ALL = STANDARD + EMNIST

# Class counts and split sizes as published (MNIST page; Xiao et al. 2017; Clanuwat et al. 2018; Cohen et al. 2017,
# "EMNIST: an extension of MNIST to handwritten letters", table II).
EXPECTED = {
    "mnist": (10, 60_000, 10_000),
    "fashion-mnist": (10, 60_000, 10_000),
    "kmnist": (10, 60_000, 10_000),
    "emnist-balanced": (47, 112_800, 18_800),
    "emnist-byclass": (62, 697_932, 116_323),
    "emnist-bymerge": (47, 697_932, 116_323),
    "emnist-digits": (10, 240_000, 40_000),
    "emnist-letters": (27, 124_800, 20_800),  # labels 1..26; 0 is unused ("N/A")
    "emnist-mnist": (10, 60_000, 10_000),
}

MNIST_HASHES = {
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}
FASHION_HASHES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


# ----------------------------------------------------------------------------------------------------------------
# registry contents


def test_registry_holds_exactly_the_known_datasets():
    specs = registry()
    assert set(specs) == set(ALL)
    assert all(isinstance(spec, DatasetSpec) and spec.name == name for name, spec in specs.items())


def test_registry_is_built_fresh_on_each_call():
    first, second = registry(), registry()
    assert first is not second
    first.pop("mnist")
    assert "mnist" in registry()


@pytest.mark.parametrize("name", ALL)
def test_classes_image_shape_and_split_sizes(name):
    spec = get_dataset(name)
    classes, train, test = EXPECTED[name]
    assert spec.num_classes == len(spec.classes) == classes
    assert len(set(spec.classes)) == classes, "class names must be distinct"
    assert spec.image_shape == (28, 28)
    assert dict(spec.split_sizes) == {"train": train, "test": test}
    assert spec.mirrors and all(m.startswith(("http://", "https://")) and m.endswith("/") for m in spec.mirrors)
    assert spec.transposed is name.startswith("emnist-")


@pytest.mark.parametrize("name", STANDARD)
def test_standard_file_names(name):
    spec = get_dataset(name)
    assert spec.file("train", IMAGES).name == "train-images-idx3-ubyte.gz"
    assert spec.file("train", LABELS).name == "train-labels-idx1-ubyte.gz"
    assert spec.file("test", IMAGES).name == "t10k-images-idx3-ubyte.gz"
    assert spec.file("test", LABELS).name == "t10k-labels-idx1-ubyte.gz"


@pytest.mark.parametrize("split_name", EMNIST_SPLITS)
def test_emnist_file_names(split_name):
    spec = get_dataset(f"emnist-{split_name}")
    for split in SPLITS:
        assert spec.file(split, IMAGES).name == f"emnist-{split_name}-{split}-images-idx3-ubyte.gz"
        assert spec.file(split, LABELS).name == f"emnist-{split_name}-{split}-labels-idx1-ubyte.gz"
    assert spec.mirrors == ("https://biometrics.nist.gov/cs_links/EMNIST/",)


@pytest.mark.parametrize("name", ALL)
def test_all_files_order_and_uniqueness(name):
    spec = get_dataset(name)
    files = spec.all_files()
    assert files == [spec.file(s, k) for s in ("train", "test") for k in (IMAGES, LABELS)]
    assert all(isinstance(f, DatasetFile) and f.name.endswith(".gz") for f in files)
    assert len({f.name for f in files}) == 4
    assert all(f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in files)


def test_mnist_and_fashion_hashes_match_shared_readme_values():
    mnist = {f.name: f.sha256 for f in get_dataset("mnist").all_files()}
    assert mnist == {**MNIST_HASHES, "train-images-idx3-ubyte.gz": None}  # no copy of train images to hash
    fashion = {f.name: f.sha256 for f in get_dataset("fashion-mnist").all_files()}
    assert fashion == FASHION_HASHES
    assert all(f.sha256 is None for name in ("kmnist",) + EMNIST for f in get_dataset(name).all_files())


def test_class_names():
    assert get_dataset("mnist").classes == tuple("0123456789")
    assert get_dataset("fashion-mnist").classes == (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert get_dataset("kmnist").classes == ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    upper = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert get_dataset("emnist-byclass").classes == tuple("0123456789") + upper + tuple("abcdefghijklmnopqrstuvwxyz")
    # balanced / bymerge keep only the 11 lowercase letters that do not look like their uppercase
    merged = tuple("0123456789") + upper + tuple("abdefghnqrt")
    assert get_dataset("emnist-balanced").classes == merged
    assert get_dataset("emnist-bymerge").classes == merged
    assert get_dataset("emnist-letters").classes == ("N/A",) + upper
    assert get_dataset("emnist-digits").classes == get_dataset("emnist-mnist").classes == tuple("0123456789")


# ----------------------------------------------------------------------------------------------------------------
# lookups


@pytest.mark.parametrize("bad", ["MNIST", "emnist", "cifar10", "", "mnist "])
def test_get_dataset_unknown_name(bad):
    with pytest.raises(InputError, match=re.escape(f"Invalid dataset: {bad!r}")) as info:
        get_dataset(bad)
    assert isinstance(info.value, ValueError)
    for name in ALL:  # the message lists every valid value
        assert repr(name) in str(info.value)


def test_file_rejects_unknown_split_and_kind():
    spec = get_dataset("mnist")
    with pytest.raises(ValueError, match=r"Invalid split: 'validation'.*'train', 'test'"):
        spec.file("validation", IMAGES)
    with pytest.raises(ValueError, match=r"Invalid kind: 'pixels'.*'images', 'labels'"):
        spec.file("train", "pixels")


# ----------------------------------------------------------------------------------------------------------------
# validate_split


def _split(rows=12, classes=10, shape=(28, 28), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(rows, *shape), dtype=np.uint8)
    labels = (np.arange(rows) % classes).astype(np.uint8)
    return images, labels


def _check(spec_name, images, labels):
    validate_split(get_dataset(spec_name), images, labels, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("name", ALL)
def test_validate_split_accepts_a_good_split(name):
    spec = get_dataset(name)
    images, labels = _split(rows=spec.num_classes * 2, classes=spec.num_classes)
    assert labels.max() == spec.num_classes - 1  # the top label is in range
    validate_split(spec, images, labels, "i.gz", "l.gz")
    validate_split(spec, images[:0], labels[:0], "i.gz", "l.gz")  # empty splits are well-formed


@pytest.mark.parametrize("shape", [(28, 27), (32, 32), (28, 28, 1), (784,)], ids=str)
def test_validate_split_wrong_image_shape(shape):
    images = np.zeros((5, *shape), dtype=np.uint8)
    labels = np.zeros(5, dtype=np.uint8)
    with pytest.raises(DatasetMismatchError, match=r"^train-images-idx3-ubyte\.gz: image shape .* is not mnist's: "
                                                   r"expected \(N, 28, 28\)"):
        _check("mnist", images, labels)


def test_validate_split_names_the_found_shape():
    with pytest.raises(DatasetMismatchError, match=re.escape("image shape (32, 32)")):
        _check("fashion-mnist", np.zeros((3, 32, 32), np.uint8), np.zeros(3, np.uint8))


@pytest.mark.parametrize("name, bad_label", [("mnist", 10), ("fashion-mnist", 255), ("emnist-balanced", 47),
                                             ("emnist-letters", 27), ("emnist-digits", 11)])
def test_validate_split_label_out_of_range(name, bad_label):
    spec = get_dataset(name)
    images, labels = _split(rows=20, classes=spec.num_classes)
    labels[13] = bad_label
    with pytest.raises(DatasetMismatchError,
                       match=rf"^train-labels-idx1-ubyte\.gz: label {bad_label} at index 13 is out of "
                             rf"{re.escape(name)}'s range 0\.\.{spec.num_classes - 1}"):
        _check(name, images, labels)


def test_validate_split_reports_the_first_bad_label():
    images, labels = _split(rows=10)
    labels[[4, 7]] = [12, 200]
    with pytest.raises(DatasetMismatchError, match="label 12 at index 4"):
        _check("mnist", images, labels)


@pytest.mark.parametrize("images_rows, labels_rows", [(10, 9), (9, 10), (0, 1)])
def test_validate_split_count_mismatch(images_rows, labels_rows):
    images, _ = _split(rows=images_rows)
    _, labels = _split(rows=labels_rows)
    with pytest.raises(DatasetMismatchError,
                       match=rf"^train-labels-idx1-ubyte\.gz: {labels_rows} labels for {images_rows} images in "
                             r"train-images-idx3-ubyte\.gz: counts must match"):
        _check("mnist", images, labels)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32, np.float64])
def test_validate_split_non_uint8_images(dtype):
    images, labels = _split()
    with pytest.raises(DatasetMismatchError,
                       match=rf"^train-images-idx3-ubyte\.gz: dtype {np.dtype(dtype).name}: expected uint8 pixels"):
        _check("mnist", images.astype(dtype), labels)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.float64])
def test_validate_split_non_uint8_labels(dtype):
    images, labels = _split()
    with pytest.raises(DatasetMismatchError,
                       match=rf"^train-labels-idx1-ubyte\.gz: dtype {np.dtype(dtype).name}: expected uint8 labels"):
        _check("mnist", images, labels.astype(dtype))


def test_validate_split_labels_not_one_dimensional():
    images, labels = _split()
    with pytest.raises(DatasetMismatchError, match=r"^train-labels-idx1-ubyte\.gz: labels of shape \(12, 1\)"):
        _check("mnist", images, labels.reshape(12, 1))


def test_dataset_mismatch_error_is_an_input_error():
    assert issubclass(DatasetMismatchError, InputError) and issubclass(DatasetMismatchError, ValueError)


# ----------------------------------------------------------------------------------------------------------------
# upright


@pytest.mark.parametrize("name", EMNIST)
def test_upright_transposes_emnist(name):
    spec = get_dataset(name)
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    out = upright(spec, images)
    assert out.shape == (2, 28, 28)
    assert np.array_equal(out, images.transpose(0, 2, 1))
    assert out[1, 3, 5] == images[1, 5, 3]
    assert out.flags.c_contiguous
    assert np.array_equal(upright(spec, out), images)  # an involution


def test_upright_transposes_non_square_emnist_images():
    images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    assert upright(get_dataset("emnist-letters"), images).shape == (2, 5, 3)


@pytest.mark.parametrize("name", STANDARD)
def test_upright_leaves_other_datasets_alone(name):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    assert upright(get_dataset(name), images) is images
