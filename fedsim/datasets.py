"""Data sets: scikit-learn's bundled sets, generated data, and MNIST-style and CIFAR files.

Every loader returns a :class:`DataArrays`: float32 features of shape ``(n, *input_shape)`` and
integer labels of shape ``(n,)`` (float32 targets for regression). File data sets are read from
``root`` in their standard published formats: IDX files (optionally gzip-compressed) for MNIST
and Fashion-MNIST, and the "python version" pickle batches for CIFAR-10 and CIFAR-100.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.seeding import numpy_rng

__all__ = [
    "DATASET_SUMMARIES",
    "DataArrays",
    "DataFileError",
    "load_dataset",
    "read_cifar_batch",
    "read_idx",
]


class DataFileError(FileNotFoundError):
    """A data file is missing or malformed; the message names the path and the files expected."""


@dataclass(frozen=True)
class DataArrays:
    """A whole data set in memory.

    ``features`` is float32 with shape ``(n, *input_shape)``; ``labels`` is int64 class ids for
    classification or float32 targets for regression, shape ``(n,)``.
    """

    features: np.ndarray
    labels: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _standardize(features: np.ndarray) -> np.ndarray:
    mean = features.mean(axis=0, keepdims=True)
    std = features.std(axis=0, keepdims=True)
    return ((features - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def _load_digits() -> DataArrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return DataArrays(features, bunch.target.astype(np.int64), (1, 8, 8), 10)


def _sklearn_tabular(loader_name: str) -> Callable[[], DataArrays]:
    def load() -> DataArrays:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader_name)()
        features = _standardize(bunch.data.astype(np.float32))
        labels = bunch.target.astype(np.int64)
        return DataArrays(features, labels, (features.shape[1],), int(labels.max()) + 1)

    return load


def make_synthetic(
    task: str, num_samples: int, num_features: int, num_classes: int, noise: float, seed: int
) -> DataArrays:
    """Generate Gaussian features labelled by a fixed random linear teacher.

    Classification labels are ``argmax(x @ W + noise)`` over ``num_classes`` columns; regression
    targets are ``x @ w + noise``. ``noise`` is the standard deviation of the Gaussian noise.
    """
    rng = numpy_rng(seed, "synthetic-data")
    features = rng.standard_normal((num_samples, num_features)).astype(np.float32)
    if task == "regression":
        teacher = rng.standard_normal(num_features) / np.sqrt(num_features)
        targets = features @ teacher + noise * rng.standard_normal(num_samples)
        return DataArrays(features, targets.astype(np.float32), (num_features,), 1, "regression")
    teacher = rng.standard_normal((num_features, num_classes))
    logits = features @ teacher + noise * rng.standard_normal((num_samples, num_classes))
    labels = logits.argmax(axis=1).astype(np.int64)
    return DataArrays(features, labels, (num_features,), num_classes)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into an array of the shape its header states.

    Raises :class:`DataFileError` on a bad magic number or a size that disagrees with the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (EOFError, gzip.BadGzipFile, OSError) as error:
        raise DataFileError(f"{str(path)!r} cannot be read: {error}; the file is truncated or not gzip data") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"{str(path)!r} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataFileError(f"{str(path)!r} is truncated: its header needs {header_size} bytes, the file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise DataFileError(
            f"{str(path)!r} holds {len(raw) - header_size} data bytes but its header "
            f"announces shape {shape} ({expected} bytes); the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


def _find_file(root: Path, dataset: str, names: list[str]) -> Path:
    folders = [root, root / dataset, root / dataset / "raw", root / dataset.upper() / "raw"]
    for folder in folders:
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    raise DataFileError(
        f"data set {dataset!r}: none of {names} (plain or .gz) found in {str(root)!r} "
        f"or its subfolders {dataset}/ and {dataset}/raw/; download the files in their "
        "standard format and set data.root to their folder"
    )


def _load_idx_dataset(dataset: str, root: Path) -> DataArrays:
    images, labels = [], []
    for prefix in ("train", "t10k"):
        image_path = _find_file(root, dataset, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
        label_path = _find_file(root, dataset, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
        batch_images, batch_labels = read_idx(image_path), read_idx(label_path)
        if batch_images.ndim != 3 or batch_labels.shape != (batch_images.shape[0],):
            raise DataFileError(
                f"{str(image_path)!r} has shape {batch_images.shape} and {str(label_path)!r} "
                f"has shape {batch_labels.shape}; expected (n, 28, 28) images and n labels"
            )
        images.append(batch_images)
        labels.append(batch_labels)
    pixels = np.concatenate(images).astype(np.float32) / 255.0
    mean, std = (0.1307, 0.3081) if dataset == "mnist" else (0.2860, 0.3530)
    features = ((pixels - mean) / std)[:, None, :, :]
    return DataArrays(features, np.concatenate(labels).astype(np.int64), tuple(features.shape[1:]), 10)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and builtins, so a batch file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data batch")


def read_cifar_batch(path: str | Path) -> dict[str, np.ndarray]:
    """Read one CIFAR "python version" batch: ``data`` (n, 3072) uint8 and the label lists.

    Keys are returned as ``str``. Only arrays, lists and builtins are unpickled.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            batch = _ArrayOnlyUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataFileError(f"{str(path)!r} is not a CIFAR python batch: {error}") from error
    if not isinstance(batch, dict):
        raise DataFileError(f"{str(path)!r} is not a CIFAR python batch: expected a dict, got {type(batch).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}


def _load_cifar(dataset: str, root: Path) -> DataArrays:
    if dataset == "cifar10":
        folder_name, names, label_key, num_classes = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", 10
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    else:
        folder_name, names, label_key, num_classes = "cifar-100-python", ["train", "test"], "fine_labels", 100
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    folder = root / folder_name if (root / folder_name).is_dir() else root
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataFileError(
            f"data set {dataset!r}: missing {missing} in {str(folder)!r}; expected the python "
            f"pickle batches {names} (the extracted '{folder_name}' folder) under data.root"
        )
    images, labels = [], []
    for name in names:
        batch = read_cifar_batch(folder / name)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataFileError(f"{str(folder / name)!r}: 'data' has shape {data.shape}, expected (n, 3072)")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    pixels = np.concatenate(images).astype(np.float32) / 255.0
    features = (pixels - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    return DataArrays(features.astype(np.float32), np.concatenate(labels), (3, 32, 32), num_classes)


DATASET_SUMMARIES: dict[str, str] = {
    "digits": "scikit-learn's 8x8 handwritten digits, 1,797 images, 10 classes (embedded, no download)",
    "breast_cancer": "scikit-learn's breast cancer set, 569 samples, 30 features, 2 classes",
    "wine": "scikit-learn's wine set, 178 samples, 13 features, 3 classes",
    "iris": "scikit-learn's iris set, 150 samples, 4 features, 3 classes",
    "synthetic": "Gaussian features labelled by a random linear teacher (data.synthetic.*)",
    "mnist": "MNIST from IDX files under data.root (train-images-idx3-ubyte, ...)",
    "fashion_mnist": "Fashion-MNIST from IDX files under data.root",
    "cifar10": "CIFAR-10 python pickle batches under data.root (cifar-10-batches-py)",
    "cifar100": "CIFAR-100 python pickle batches under data.root (cifar-100-python)",
}


def load_dataset(
    name: str,
    root: str | None = None,
    seed: int = 0,
    synthetic: dict[str, object] | None = None,
) -> DataArrays:
    """Load data set ``name`` whole.

    ``root`` is the folder of a file data set; ``synthetic`` holds the generator's settings
    (``task``, ``num_samples``, ``num_features``, ``num_classes``, ``noise``). Raises
    :class:`DataFileError` when files are missing and ``ValueError`` for an unknown name.
    """
    if name == "digits":
        return _load_digits()
    if name in ("breast_cancer", "wine", "iris"):
        return _sklearn_tabular(f"load_{name}")()
    if name == "synthetic":
        options = dict(synthetic or {})
        return make_synthetic(
            str(options.get("task", "classification")),
            int(options.get("num_samples", 2000)),  # type: ignore[arg-type]
            int(options.get("num_features", 20)),  # type: ignore[arg-type]
            int(options.get("num_classes", 4)),  # type: ignore[arg-type]
            float(options.get("noise", 0.1)),  # type: ignore[arg-type]
            seed,
        )
    if name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        if root is None:
            raise DataFileError(f"data set {name!r} is read from disk: set data.root to the folder of its files")
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DataFileError(f"data.root {str(folder)!r} is not a folder; set it to the folder holding the {name} files")
        if name in ("mnist", "fashion_mnist"):
            return _load_idx_dataset(name, folder)
        return _load_cifar(name, folder)
    raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASET_SUMMARIES)}")
