"""Distances between a replayed and an observed update, and image priors (per victim, unbatched)."""
import torch

Update = dict[str, torch.Tensor]


def total(terms) -> torch.Tensor:
    """The sum of scalar tensors (a tensor even for no terms, unlike the built-in sum's 0)."""
    return torch.stack(list(terms)).sum()


def squared_distance(simulated: Update, observed: Update) -> torch.Tensor:
    return total(((simulated[name] - observed[name]) ** 2).sum() for name in observed)


def cosine_distance(simulated: Update, observed: Update) -> torch.Tensor:
    """1 - cosine similarity over all parameters as one vector (Inverting Gradients' objective)."""
    dot = total((simulated[name] * observed[name]).sum() for name in observed)
    sim_norm = total((simulated[name] ** 2).sum() for name in observed).sqrt()
    obs_norm = total((observed[name] ** 2).sum() for name in observed).sqrt()
    return 1 - dot / (sim_norm * obs_norm + 1e-12)


OBJECTIVES = {"l2": squared_distance, "cosine": cosine_distance}


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels: natural images are mostly smooth."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy
