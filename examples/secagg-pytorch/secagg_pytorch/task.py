"""The model, the data and the training: plain PyTorch and flwr-datasets, nothing of Flower's runtime."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, ToTensor

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ToTensor's [0, 1] mapped to [-1, 1]
TRANSFORM = Compose([ToTensor(), Normalize(MEAN, STD)])
_sources: dict[tuple[str, int], FederatedDataset] = {}


class Net(nn.Module):
    """Two 5x5 convolutions with 2x2 max pooling, then three linear layers, for 32x32 colour images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv2(self.pool(F.relu(self.conv1(x))))))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def get_weights(net: nn.Module) -> list:
    """The model's arrays in state_dict order, as the legacy NumPyClient exchanges them."""
    return [value.cpu().numpy() for value in net.state_dict().values()]


def set_weights(net: nn.Module, arrays: list) -> None:
    """Loads arrays in state_dict order, strictly (every key, every shape)."""
    net.load_state_dict({key: torch.tensor(array) for key, array in zip(net.state_dict(), arrays, strict=True)})


def _with_tensors(batch: dict) -> dict:
    images = batch["img"] if "img" in batch else batch["image"]
    return {"img": [TRANSFORM(image.convert("RGB")) for image in images], "label": batch["label"]}


def load_data(partition_id: int, num_partitions: int, batch_size: int, data_path: str,
              max_train_examples: int) -> DataLoader:
    """This client's training loader: its IID partition of the image folder at `data_path` (CIFAR-10 from the hub
    when empty), 80% of it, at most `max_train_examples` images (0: all)."""
    key = (data_path, num_partitions)
    if key not in _sources:
        source = {"dataset": "imagefolder", "data_dir": data_path} if data_path else {"dataset": "uoft-cs/cifar10"}
        _sources[key] = FederatedDataset(**source, partitioners={"train": IidPartitioner(num_partitions)})
    part = _sources[key].load_partition(partition_id, "train").train_test_split(test_size=0.2, seed=42)["train"]
    if max_train_examples:
        part = part.select(range(min(max_train_examples, len(part))))
    return DataLoader(part.with_transform(_with_tensors), batch_size=batch_size, shuffle=True)


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """`epochs` passes of SGD (momentum 0.9) on the cross-entropy; the mean loss."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    losses = []
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(batch["img"]), batch["label"])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)
