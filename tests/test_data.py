"""Tests of the data readers, the partitioners and each client's train and test split.

File data sets are written here in their standard published formats (IDX for MNIST, the python
pickle batches for CIFAR), a few examples each, and read back through the same code as real
downloads.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import DataSection, PartitionerSection, SyntheticSection, to_dict
from fedsim.datasets import DataFileError, load_dataset, read_cifar_batch, read_idx
from fedsim.partition import PartitionError, client_data, partition_indices, pooled_test_data

IMAGE_MAGIC = 0x00000803  # unsigned bytes, three dimensions
LABEL_MAGIC = 0x00000801  # unsigned bytes, one dimension


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_dataset("digits").labels


# --- IDX files ----------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def tiny_images(count: int, start: int) -> np.ndarray:
    """Return ``count`` 28x28 images, image ``i`` filled with the value ``start + i``."""
    return np.stack([np.full((28, 28), start + i, dtype=np.uint8) for i in range(count)])


def write_mnist(folder: Path, gz: bool = False) -> None:
    """Write 3 training and 2 test images with labels 7, 1, 0 and 4, 9."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", tiny_images(3, 0), IMAGE_MAGIC)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.array([7, 1, 0]), LABEL_MAGIC)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", tiny_images(2, 253), IMAGE_MAGIC)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.array([4, 9]), LABEL_MAGIC)


def test_read_idx_images(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    path = write_idx(tmp_path / "images", images, IMAGE_MAGIC)

    read = read_idx(path)

    assert read.shape == (2, 28, 28)
    np.testing.assert_array_equal(read, images)


def test_read_idx_gzip_labels(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", np.array([3, 1, 4, 1, 5]), LABEL_MAGIC)

    read = read_idx(path)

    np.testing.assert_array_equal(read, [3, 1, 4, 1, 5])


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(tiny_images(2, 0), IMAGE_MAGIC)[:-5])

    with pytest.raises(DataFileError) as caught:
        read_idx(path)

    assert repr(str(path)) in str(caught.value)
    assert "truncated" in str(caught.value)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(b"\x08\x03" + idx_bytes(tiny_images(1, 0), IMAGE_MAGIC)[2:])

    with pytest.raises(DataFileError) as caught:
        read_idx(path)

    assert str(caught.value) == f"{str(path)!r} is not an IDX file (bad magic number)"


def test_read_idx_cut_header(tmp_path: Path) -> None:
    # Magic and the first of three dimensions: 8 of the 16 header bytes.
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(tiny_images(1, 0), IMAGE_MAGIC)[:8])

    with pytest.raises(DataFileError, match="images"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(tiny_images(2, 0), IMAGE_MAGIC))[:40])

    with pytest.raises(DataFileError, match="images.gz"):
        read_idx(path)


def test_load_mnist_plain(tmp_path: Path) -> None:
    write_mnist(tmp_path)

    data = load_dataset("mnist", root=str(tmp_path))

    # Training images come first, then the t10k images: 3 + 2 = 5.
    assert data.features.shape == (5, 1, 28, 28)
    assert data.input_shape == (1, 28, 28)
    assert data.num_classes == 10
    np.testing.assert_array_equal(data.labels, [7, 1, 0, 4, 9])


def test_load_mnist_normalized(tmp_path: Path) -> None:
    write_mnist(tmp_path)

    data = load_dataset("mnist", root=str(tmp_path))

    # Pixel 0 of image 0 and pixel 254 of the last image, scaled to [0, 1] and standardized
    # with MNIST's published mean 0.1307 and standard deviation 0.3081.
    assert data.features[0, 0, 0, 0] == pytest.approx((0.0 - 0.1307) / 0.3081, rel=1e-5)
    assert data.features[4, 0, 27, 27] == pytest.approx((254 / 255 - 0.1307) / 0.3081, rel=1e-5)


def test_load_mnist_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)

    data = load_dataset("mnist", root=str(tmp_path))

    np.testing.assert_array_equal(data.labels, [7, 1, 0, 4, 9])


def test_load_fashion_mnist_raw_folder(tmp_path: Path) -> None:
    write_mnist(tmp_path / "fashion_mnist" / "raw")

    data = load_dataset("fashion_mnist", root=str(tmp_path))

    assert data.features.shape == (5, 1, 28, 28)
    # Fashion-MNIST's mean 0.2860 and standard deviation 0.3530.
    assert data.features[0, 0, 0, 0] == pytest.approx((0.0 - 0.2860) / 0.3530, rel=1e-5)


def test_load_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as caught:
        load_dataset("mnist", root=str(tmp_path))

    message = str(caught.value)
    assert repr(str(tmp_path)) in message
    assert "train-images-idx3-ubyte" in message


def test_load_mnist_missing_labels(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()

    with pytest.raises(DataFileError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=str(tmp_path))


def test_load_mnist_root_not_folder(tmp_path: Path) -> None:
    absent = tmp_path / "absent"

    with pytest.raises(DataFileError) as caught:
        load_dataset("mnist", root=str(absent))

    assert repr(str(absent)) in str(caught.value)


def test_load_mnist_without_root() -> None:
    with pytest.raises(DataFileError, match="data.root"):
        load_dataset("mnist")


# --- CIFAR pickle batches -------------------------------------------------------------------------


def write_batch(path: Path, batch: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch))
    return path


def cifar_rows(count: int, value: int) -> np.ndarray:
    """Return ``count`` flat images: red plane ``value``, green plane ``value + 1``, blue 0."""
    rows = np.zeros((count, 3072), dtype=np.uint8)
    rows[:, :1024] = value
    rows[:, 1024:2048] = value + 1
    return rows


def test_load_cifar10(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    for index in range(1, 6):
        write_batch(folder / f"data_batch_{index}", {b"data": cifar_rows(2, index), b"labels": [index, 0]})
    write_batch(folder / "test_batch", {b"data": cifar_rows(2, 100), b"labels": [9, 8]})

    data = load_dataset("cifar10", root=str(tmp_path))

    # Five training batches of 2 and a test batch of 2: 12 images.
    assert data.features.shape == (12, 3, 32, 32)
    assert data.num_classes == 10
    np.testing.assert_array_equal(data.labels, [1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 9, 8])


def test_load_cifar10_channels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    for index in range(1, 6):
        write_batch(folder / f"data_batch_{index}", {b"data": cifar_rows(1, 50), b"labels": [0]})
    write_batch(folder / "test_batch", {b"data": cifar_rows(1, 50), b"labels": [0]})

    data = load_dataset("cifar10", root=str(tmp_path))

    # The first 1024 bytes are the red plane (50), the next 1024 the green plane (51), then blue
    # (0), each standardized with CIFAR-10's per-channel mean and standard deviation.
    assert data.features[0, 0, 31, 31] == pytest.approx((50 / 255 - 0.4914) / 0.2470, rel=1e-5)
    assert data.features[0, 1, 0, 0] == pytest.approx((51 / 255 - 0.4822) / 0.2435, rel=1e-5)
    assert data.features[0, 2, 0, 0] == pytest.approx((0.0 - 0.4465) / 0.2616, rel=1e-5)


def test_load_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    write_batch(folder / "train", {b"data": cifar_rows(3, 0), b"fine_labels": [99, 0, 42], b"coarse_labels": [19, 0, 4]})
    write_batch(folder / "test", {b"data": cifar_rows(2, 0), b"fine_labels": [7, 8], b"coarse_labels": [1, 2]})

    data = load_dataset("cifar100", root=str(tmp_path))

    assert data.features.shape == (5, 3, 32, 32)
    assert data.num_classes == 100
    np.testing.assert_array_equal(data.labels, [99, 0, 42, 7, 8])


def test_load_cifar10_missing_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    for index in range(1, 5):
        write_batch(folder / f"data_batch_{index}", {b"data": cifar_rows(1, 0), b"labels": [0]})
    write_batch(folder / "test_batch", {b"data": cifar_rows(1, 0), b"labels": [0]})

    with pytest.raises(DataFileError) as caught:
        load_dataset("cifar10", root=str(tmp_path))

    assert "missing ['data_batch_5']" in str(caught.value)
    assert repr(str(folder)) in str(caught.value)


def test_read_cifar_batch_keys(tmp_path: Path) -> None:
    path = write_batch(tmp_path / "batch", {b"data": cifar_rows(2, 0), b"labels": [3, 4]})

    batch = read_cifar_batch(path)

    assert sorted(batch) == ["data", "labels"]
    assert batch["data"].shape == (2, 3072)
    assert batch["labels"] == [3, 4]


def test_read_cifar_batch_rejects_function(tmp_path: Path) -> None:
    # A pickle may name any importable callable, but the batch reader accepts only arrays and builtins.
    path = write_batch(tmp_path / "batch", {b"data": os.getcwd, b"labels": []})

    with pytest.raises(DataFileError) as caught:
        read_cifar_batch(path)

    assert repr(str(path)) in str(caught.value)
    assert "getcwd" in str(caught.value)


def test_read_cifar_batch_truncated(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": cifar_rows(2, 0), b"labels": [1, 2]})[:50])

    with pytest.raises(DataFileError, match="not a CIFAR python batch"):
        read_cifar_batch(path)


def test_read_cifar_batch_not_dict(tmp_path: Path) -> None:
    path = write_batch(tmp_path / "batch", [1, 2, 3])

    with pytest.raises(DataFileError, match="batch"):
        read_cifar_batch(path)


# --- bundled and generated data -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "num_classes"),
    [
        # scikit-learn's documented sizes: 1,797 8x8 digits, 569 x 30, 178 x 13, 150 x 4.
        ("digits", (1797, 1, 8, 8), 10),
        ("breast_cancer", (569, 30), 2),
        ("wine", (178, 13), 3),
        ("iris", (150, 4), 3),
    ],
)
def test_sklearn_dataset_shape(name: str, shape: tuple[int, ...], num_classes: int) -> None:
    data = load_dataset(name)

    assert data.features.shape == shape
    assert data.features.dtype == np.float32
    assert data.input_shape == shape[1:]
    assert data.num_classes == num_classes
    assert sorted(np.unique(data.labels)) == list(range(num_classes))


def test_tabular_features_standardized() -> None:
    data = load_dataset("wine")

    np.testing.assert_allclose(data.features.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.features.std(axis=0), 1.0, atol=1e-4)


SYNTHETIC = {"task": "classification", "num_samples": 300, "num_features": 6, "num_classes": 3, "noise": 0.1}


def test_synthetic_same_seed_same_data() -> None:
    first = load_dataset("synthetic", seed=4, synthetic=SYNTHETIC)
    second = load_dataset("synthetic", seed=4, synthetic=SYNTHETIC)

    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_array_equal(first.labels, second.labels)


def test_synthetic_other_seed_other_data() -> None:
    first = load_dataset("synthetic", seed=4, synthetic=SYNTHETIC)
    second = load_dataset("synthetic", seed=5, synthetic=SYNTHETIC)

    assert not np.array_equal(first.features, second.features)


def test_synthetic_shape() -> None:
    data = load_dataset("synthetic", seed=0, synthetic=SYNTHETIC)

    assert data.features.shape == (300, 6)
    assert data.num_classes == 3
    assert set(np.unique(data.labels)) <= {0, 1, 2}


def test_synthetic_regression() -> None:
    data = load_dataset("synthetic", seed=0, synthetic={**SYNTHETIC, "task": "regression"})

    assert data.task == "regression"
    assert data.labels.dtype == np.float32
    assert data.labels.shape == (300,)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown data set 'mnsit'"):
        load_dataset("mnsit")


# --- partitioners -------------------------------------------------------------------------------


def assert_exact_cover(parts: list[np.ndarray], size: int) -> None:
    """Assert that the partitions contain every index ``0..size-1`` exactly once."""
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(size))


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Return the mean over clients of the total-variation distance to the global label histogram."""
    classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=classes) / len(labels)
    distances = []
    for part in parts:
        local = np.bincount(labels[part], minlength=classes) / len(part)
        distances.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(distances))


DIRICHLET = {"name": "dirichlet", "alpha": 0.5, "min_partition_size": 10}


def test_iid_sizes_balanced(digits_labels: np.ndarray) -> None:
    parts = partition_indices(digits_labels, 10, {"name": "iid"}, seed=0)

    sizes = [len(part) for part in parts]
    # 1,797 = 10 * 179 + 7: seven partitions of 180 and three of 179.
    assert sorted(sizes) == [179] * 3 + [180] * 7


def test_iid_exact_cover(digits_labels: np.ndarray) -> None:
    parts = partition_indices(digits_labels, 10, {"name": "iid"}, seed=0)

    assert_exact_cover(parts, 1797)


def test_dirichlet_exact_cover(digits_labels: np.ndarray) -> None:
    parts = partition_indices(digits_labels, 10, DIRICHLET, seed=0)

    assert len(parts) == 10
    assert_exact_cover(parts, 1797)


def test_dirichlet_min_size(digits_labels: np.ndarray) -> None:
    spec = {"name": "dirichlet", "alpha": 0.1, "min_partition_size": 40}

    parts = partition_indices(digits_labels, 10, spec, seed=0)

    assert min(len(part) for part in parts) >= 40


def test_dirichlet_same_seed(digits_labels: np.ndarray) -> None:
    first = partition_indices(digits_labels, 10, DIRICHLET, seed=3)
    second = partition_indices(digits_labels, 10, DIRICHLET, seed=3)

    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dirichlet_other_seed(digits_labels: np.ndarray) -> None:
    first = partition_indices(digits_labels, 10, DIRICHLET, seed=3)
    second = partition_indices(digits_labels, 10, DIRICHLET, seed=4)

    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_dirichlet_skew_grows_as_alpha_falls(digits_labels: np.ndarray) -> None:
    skewed = partition_indices(digits_labels, 10, {**DIRICHLET, "alpha": 0.1}, seed=0)
    even = partition_indices(digits_labels, 10, {**DIRICHLET, "alpha": 10.0}, seed=0)

    assert label_skew(digits_labels, skewed) > label_skew(digits_labels, even)


def test_shards_classes_per_client(digits_labels: np.ndarray) -> None:
    spec = {"name": "shards", "classes_per_client": 2}

    parts = partition_indices(digits_labels, 10, spec, seed=0)

    for part in parts:
        assert len(np.unique(digits_labels[part])) <= 2


def test_shards_disjoint(digits_labels: np.ndarray) -> None:
    parts = partition_indices(digits_labels, 10, {"name": "shards", "classes_per_client": 2}, seed=0)

    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)


def test_dirichlet_impossible_min_size(digits_labels: np.ndarray) -> None:
    # 10 clients of at least 200 examples need 2,000 examples; digits has 1,797.
    spec = {"name": "dirichlet", "alpha": 0.5, "min_partition_size": 200}

    with pytest.raises(PartitionError) as caught:
        partition_indices(digits_labels, 10, spec, seed=0)

    assert "data.partitioner.min_partition_size" in str(caught.value)


def test_shards_too_many_classes(digits_labels: np.ndarray) -> None:
    spec = {"name": "shards", "classes_per_client": 11}

    with pytest.raises(PartitionError) as caught:
        partition_indices(digits_labels, 10, spec, seed=0)

    assert str(caught.value) == (
        "data.partitioner.classes_per_client is 11 but the data set has only 10 classes; "
        "set it to at most 10"
    )


def test_fewer_examples_than_clients() -> None:
    with pytest.raises(PartitionError) as caught:
        partition_indices(np.array([0, 1, 0]), 5, {"name": "iid"}, seed=0)

    assert str(caught.value) == (
        "3 examples cannot fill 5 partitions; lower data.num_clients or raise data.max_samples"
    )


def test_unknown_partitioner(digits_labels: np.ndarray) -> None:
    with pytest.raises(PartitionError, match="unknown partitioner 'bogus'"):
        partition_indices(digits_labels, 2, {"name": "bogus"}, seed=0)


# --- client splits --------------------------------------------------------------------------------


def synthetic_spec(partitioner: str = "iid", task: str = "classification") -> dict[str, object]:
    # 200 Gaussian examples, so every feature row is distinct and identifies its example.
    section = DataSection(
        dataset="synthetic",
        num_clients=5,
        test_fraction=0.25,
        partitioner=PartitionerSection(name=partitioner),
        synthetic=SyntheticSection(task=task, num_samples=200, num_features=4, num_classes=3),
    )
    return to_dict(section)


def row_set(features: np.ndarray) -> set[tuple[float, ...]]:
    return {tuple(row) for row in features.tolist()}


def test_client_split_sizes() -> None:
    spec = synthetic_spec()

    for partition_id in range(5):
        data = client_data(spec, 0, partition_id)
        # 200 examples over 5 iid clients is 40 each, and a test fraction of 0.25 keeps 10 of them.
        assert len(data.test_y) == 10
        assert len(data.train_y) == 30


def test_client_split_disjoint() -> None:
    spec = synthetic_spec()

    for partition_id in range(5):
        data = client_data(spec, 0, partition_id)
        assert not row_set(data.train_x) & row_set(data.test_x)


def test_client_splits_cover_dataset() -> None:
    spec = synthetic_spec()
    whole = load_dataset("synthetic", seed=0, synthetic=spec["synthetic"])

    seen: set[tuple[float, ...]] = set()
    for partition_id in range(5):
        data = client_data(spec, 0, partition_id)
        seen |= row_set(data.train_x) | row_set(data.test_x)

    assert seen == row_set(whole.features)


def test_pooled_test_is_union() -> None:
    spec = synthetic_spec()
    tests = [client_data(spec, 0, partition_id) for partition_id in range(5)]

    pooled_x, pooled_y = pooled_test_data(spec, 0)

    np.testing.assert_array_equal(pooled_x, np.concatenate([data.test_x for data in tests]))
    np.testing.assert_array_equal(pooled_y, np.concatenate([data.test_y for data in tests]))


def test_client_partition_id_out_of_range() -> None:
    with pytest.raises(PartitionError, match="partition id 5 is out of range for 5 clients"):
        client_data(synthetic_spec(), 0, 5)


def test_regression_needs_iid() -> None:
    spec = synthetic_spec(partitioner="dirichlet", task="regression")

    with pytest.raises(PartitionError, match="data.partitioner.name=iid"):
        client_data(spec, 0, 0)
