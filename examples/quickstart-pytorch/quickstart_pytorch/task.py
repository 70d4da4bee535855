"""The model, the data and the training of the app: plain PyTorch, nothing of Flower's runtime."""
from __future__ import annotations

import datasets
import torch
import torch.nn.functional as F
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, ToTensor

HUB_DATASET = "uoft-cs/cifar10"
# ToTensor gives pixels in [0, 1]; this maps them to [-1, 1] on every channel.
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class Net(nn.Module):
    """A small CNN for 32x32 RGB images: two 5x5 convolutions with max pooling, then three linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (logits) of a batch of normalized images.

        Parameters
        ----------
        x : torch.Tensor
            Images, shape (N, 3, 32, 32), normalized with MEAN and STD.

        Returns
        -------
        torch.Tensor
            Logits, shape (N, 10).
        """
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


_images = Compose([ToTensor(), Normalize(MEAN, STD)])
_federations: dict[tuple[str, int], FederatedDataset] = {}  # per process: each source is read and split once


def _to_tensors(batch: dict) -> dict:
    images = batch["img"] if "img" in batch else batch["image"]  # the hub's column name, the image folder's
    return {"img": [_images(image.convert("RGB")) for image in images], "label": batch["label"]}


def _partition(partition_id: int, num_partitions: int, data_path: str) -> datasets.Dataset:
    """This client's IID share of the training images (shuffled once with a fixed seed, then cut into equal
    parts): of the local image folder at `data_path` (one sub-folder per class, read by `datasets`'
    "imagefolder" loader), or of CIFAR-10's training set on the Hugging Face hub when `data_path` is empty."""
    key = (data_path, num_partitions)
    if key not in _federations:
        source = {"dataset": "imagefolder", "data_dir": data_path} if data_path else {"dataset": HUB_DATASET}
        _federations[key] = FederatedDataset(**source, partitioners={"train": IidPartitioner(num_partitions)})
    return _federations[key].load_partition(partition_id, "train")


def load_data(partition_id: int, num_partitions: int, batch_size: int, data_path: str = "",
              max_train_examples: int = 0) -> tuple[DataLoader, DataLoader]:
    """One client's data: its IID partition split 80/20 into training and test images.

    Parameters
    ----------
    partition_id : int
        Which partition (0 to num_partitions - 1).
    num_partitions : int
        How many clients share the data.
    batch_size : int
        Images per batch of both loaders.
    data_path : str
        A local image folder (one sub-folder per class); empty: CIFAR-10 from the Hugging Face hub.
    max_train_examples : int
        Keep at most this many training images (0: all of them), for small runs.

    Returns
    -------
    tuple[DataLoader, DataLoader]
        The training loader (reshuffled every epoch) and the test loader; batches are dicts with "img"
        (normalized tensors) and "label".
    """
    split = _partition(partition_id, num_partitions, data_path).train_test_split(test_size=0.2, seed=42)
    train_set, test_set = split["train"], split["test"]
    if max_train_examples:
        train_set = train_set.select(range(min(max_train_examples, len(train_set))))
    train_set, test_set = train_set.with_transform(_to_tensors), test_set.with_transform(_to_tensors)
    return (DataLoader(train_set, batch_size=batch_size, shuffle=True),
            DataLoader(test_set, batch_size=batch_size))


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    """Local training: `epochs` passes over the loader with SGD (momentum 0.9) on the cross-entropy.

    Parameters
    ----------
    net : nn.Module
        The model, trained in place.
    loader : DataLoader
        The client's training batches.
    epochs : int
        Passes over the loader.
    lr : float
        SGD's learning rate.
    device : torch.device
        Where to train.

    Returns
    -------
    float
        The mean training loss over all steps.
    """
    net.to(device).train()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(batch["img"].to(device)), batch["label"].to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def test(net: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """The model's mean cross-entropy and accuracy on a loader.

    Parameters
    ----------
    net : nn.Module
        The model.
    loader : DataLoader
        The test batches.
    device : torch.device
        Where to evaluate.

    Returns
    -------
    tuple[float, float]
        Mean loss per image and the share of images classified right.
    """
    net.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct, seen = 0.0, 0, 0
    for batch in loader:
        images, labels = batch["img"].to(device), batch["label"].to(device)
        logits = net(images)
        total_loss += loss_fn(logits, labels).item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return total_loss / max(seen, 1), correct / max(seen, 1)
