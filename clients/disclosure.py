"""`fl_sim.disclose`: what a user's ClientApp trained on, told to the auditing server. In a simulation only.

A stock client sends the server nothing of its data, so an audit (fl_sim/server/audit.py) scores each
reconstruction against its nearest image of a reference set. In a simulation, where the auditor already holds the
federation's data, one call in the ClientApp's train function adds the client's training images and labels to its
reply (an ArrayRecord the auditing server takes off before anything else reads the reply), and the audit scores
against them exactly, after optimal matching.

Never run it in a deployment: it sends the client's private data to the server.
"""
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, RecordDict

from fl_sim.contract.protocol import DISCLOSED

__all__ = ["disclose"]


def disclose(content: RecordDict, data: Iterable | tuple[torch.Tensor, torch.Tensor]) -> RecordDict:
    """Adds what the client trained on to its reply's `content` (simulation only: it sends the data to the server).

    Parameters
    ----------
    content
        The reply's RecordDict (its "arrays" and "metrics"), changed in place.
    data
        The client's training data: a DataLoader or dataset yielding (image, label) pairs or {"img"/"image",
        "label"} dicts as the client's transform gives them (normalized as its model sees them), or an
        (images, labels) pair of tensors.

    Returns
    -------
    RecordDict
        `content`, for chaining.
    """
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(part, torch.Tensor) for part in data):
        images, labels = data
    else:
        image_parts, label_parts = [], []
        for item in data:
            image, label = _pair(item)
            batched = image.dim() == 4
            image_parts.append(image if batched else image[None])
            label_parts.append(torch.as_tensor(label).reshape(-1))
        if not image_parts:
            raise ValueError("fl_sim.disclose: the client's data is empty")
        images, labels = torch.cat(image_parts), torch.cat(label_parts)
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"fl_sim.disclose: images must be (N, C, H, W) with N labels, got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    content[DISCLOSED] = ArrayRecord({"images": images.detach().float().cpu().contiguous(),
                                      "labels": labels.detach().long().cpu().contiguous()})
    return content


def _pair(item) -> tuple[torch.Tensor, object]:
    if isinstance(item, dict):
        image = next((item[key] for key in ("img", "image", "x") if key in item), None)
        label = next((item[key] for key in ("label", "labels", "y", "fine_label") if key in item), None)
        if image is None or label is None:
            raise ValueError(f"fl_sim.disclose: cannot tell the image and label among the keys {sorted(item)}")
        return torch.as_tensor(image), label
    image, label = item[0], item[1]
    return torch.as_tensor(image), label
