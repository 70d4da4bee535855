"""How well a model does on labelled examples: the global model on the test split (server) or on a
client's share of it (federated evaluation)."""
import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.learning.data import ImageDataset


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: ImageDataset, indices, batch_size: int = 1000) -> dict:
    """Accuracy and mean cross-entropy of `model` on the given examples of `dataset`."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, len(indices), batch_size):
        images, labels = dataset.tensors(indices[start: start + batch_size])
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    count = len(indices)
    return {"accuracy": correct / count, "loss": loss_sum / count, "num-examples": count}
