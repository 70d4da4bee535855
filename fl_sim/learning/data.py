"""Datasets by name (`mnist`, `cifar10`, `imagefolder`), as [0, 1] float tensors.

The data root comes from `--data-root`, else the FL_SIM_DATA environment variable, else `./data`.
MNIST and CIFAR-10 use torchvision's own classes and download when the machine is online; offline,
a root without the files gets one clear error that says what to do. For CIFAR-10, a root holding
`cifar10-subset/{train,test}/<class>/*.png` (the layout of the shared offline sample) is read too.
"""
import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from fl_sim.contract.names import DATASETS
from fl_sim.contract.setting import ConfigError

DATA_ROOT_ENV = "FL_SIM_DATA"


class DataNotFoundError(FileNotFoundError):
    """The data set is neither on disk nor downloadable."""


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    return Path(data_root or os.environ.get(DATA_ROOT_ENV) or "data").expanduser()


@dataclass
class ImageDataset:
    """Images as uint8 on demand, converted to [0, 1] floats only for the indices asked for."""

    name: str
    labels: np.ndarray  # (N,) int64, the class of every example
    num_classes: int
    channels: int
    image_size: int
    _pixels: np.ndarray | None = None  # (N, H, W, C) uint8, when the whole split is in memory
    _files: list[str] | None = None  # image paths, when it is read lazily

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (n, C, H, W) in [0, 1], labels (n,)) for the given example indices."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._pixels is not None:
            pixels = self._pixels[indices]
        else:
            files = self._files or []  # an image folder's: one of the two is always set
            pixels = np.stack([self._read(files[i]) for i in indices]) if len(indices) else (
                np.zeros((0, self.image_size, self.image_size, self.channels), np.uint8))
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        return images.contiguous(), torch.from_numpy(self.labels[indices])

    def _read(self, path: str) -> np.ndarray:
        with Image.open(path) as opened:
            image = opened.convert("L" if self.channels == 1 else "RGB")
            if image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).reshape(self.image_size, self.image_size, self.channels)


def load_dataset(name: str, data_root: str | os.PathLike | None = None, train: bool = True) -> ImageDataset:
    """The train or test split of a data set by name; see the module docstring for where it looks."""
    root = resolve_data_root(data_root)
    if name == "mnist":
        return _torchvision_dataset(torchvision.datasets.MNIST, "mnist", root, train)
    if name == "cifar10":
        subset = root / "cifar10-subset" / ("train" if train else "test")
        if not (root / "cifar-10-batches-py").is_dir() and subset.is_dir():
            return image_folder(subset, "cifar10")
        return _torchvision_dataset(torchvision.datasets.CIFAR10, "cifar10", root, train)
    if name == "imagefolder":
        split = root / ("train" if train else "test")
        return image_folder(split if split.is_dir() else root, "imagefolder")
    raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def _torchvision_dataset(cls, name: str, root: Path, train: bool) -> ImageDataset:
    try:
        dataset = cls(str(root), train=train, download=False)
    except RuntimeError as error:
        if "not found" not in str(error):  # the files are there but cannot be read: not a download's job
            raise damaged(name, root, error) from None
        dataset = _download(cls, name, root, train)
    except Exception as error:  # a truncated or overwritten file torchvision found and could not parse
        raise damaged(name, root, error) from None
    pixels = np.asarray(dataset.data)
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return ImageDataset(name, labels, len(dataset.classes), pixels.shape[-1], pixels.shape[1], _pixels=pixels)


def _download(cls, name: str, root: Path, train: bool):
    """torchvision's download into an existing root; a failed one leaves no folder behind, and a root that does
    not exist (mistyped) is never created."""
    missing = DataNotFoundError(
        f"{name} is not under {str(root)!r}{'' if root.is_dir() else ' (no such folder)'} and could not be "
        f"downloaded. Point --data-root (or ${DATA_ROOT_ENV}) at a folder holding it, e.g. ../shared/data "
        f"offline, or run once with internet to download it there.")
    if not root.is_dir():
        raise missing
    before = set(root.iterdir())
    try:
        return cls(str(root), train=train, download=True)
    except Exception:  # no network, or a mirror is down
        for made in set(root.iterdir()) - before:  # the download's empty folders (MNIST/raw), nothing with data
            if made.is_dir() and not made.is_symlink() and not any(path.is_file() for path in made.rglob("*")):
                shutil.rmtree(made)
        raise missing from None


def damaged(name: str, root: Path, error: Exception) -> ConfigError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:100]
    return ConfigError(f"{name} under {str(root)!r} is there but cannot be read ({reason}): a file of it is damaged "
                       f"(a download cut short?); delete its folder and download it again, or point --data-root "
                       f"elsewhere")


def image_folder(folder: Path, name: str) -> ImageDataset:
    """An image folder of class sub-folders (torchvision's ImageFolder layout), its files read when asked."""
    if not folder.is_dir():
        raise DataNotFoundError(
            f"{str(folder)!r} is not a folder of class sub-folders. Point --data-root (or ${DATA_ROOT_ENV}) "
            f"at one (a train/ and test/ pair of them is used as the two splits)."
        )
    try:
        dataset = torchvision.datasets.ImageFolder(str(folder))
    except FileNotFoundError as error:
        raise DataNotFoundError(f"no images in {str(folder)!r}: {error}") from None
    if len(dataset.classes) < 2:
        raise ConfigError(f"{str(folder)!r} holds one class ({dataset.classes[0]!r}): a classifier needs at least "
                          "two class sub-folders (with one, every label is right and training changes nothing)")
    first_file = dataset.samples[0][0]
    try:
        with Image.open(first_file) as first:
            first.load()
            channels = 1 if first.mode in ("L", "1", "I;16") else 3
            size = first.size[0]
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ConfigError(f"{first_file!r} is not an image that can be read ({type(error).__name__}): replace or "
                          f"remove it") from None
    files = [path for path, _ in dataset.samples]
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return ImageDataset(name, labels, len(dataset.classes), channels, size, _files=files)


def check_images(dataset: ImageDataset) -> None:
    """Every file of an image folder opened once, as a command starts (not in every client process): its header
    and, without decoding it, the rest of its structure (PIL's `verify`: a PNG's chunk checksums, a truncated
    file). A file that fails is refused naming it (ConfigError), instead of its client failing mid-run."""
    for path in dataset._files or ():
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            reason = (str(error).strip().splitlines() or [""])[0][:80]
            raise ConfigError(f"{path!r} is not an image that can be read ({type(error).__name__}"
                              f"{': ' + reason if reason else ''}): replace or remove it") from None


@functools.lru_cache(maxsize=4)
def cached_dataset(name: str, data_root: str | None, train: bool) -> ImageDataset:
    """A split loaded once per process: clients run many rounds in one long-lived worker."""
    return load_dataset(name, data_root, train=train)


def image_spec(dataset: ImageDataset) -> tuple[tuple[int, int, int], int]:
    """((C, H, W), classes) of a data set: all the attacker knows about its inputs."""
    return (dataset.channels, dataset.image_size, dataset.image_size), dataset.num_classes
