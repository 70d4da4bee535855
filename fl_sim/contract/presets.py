"""What an optimisation attack is: its objective, optimiser, label strategy and priors (`AttackConfig`).

Each passive attack's preset is registered with it in fl_sim/contract/attacks.py (`AttackSpec.preset`);
attacker/engine.py runs one. Standard library only.
"""
from dataclasses import dataclass
from enum import StrEnum


class Objective(StrEnum):
    L2 = "l2"  # squared distance of updates
    COSINE = "cosine"  # 1 - cosine similarity


class Optimizer(StrEnum):
    LBFGS = "lbfgs"
    ADAM = "adam"
    SIGNED_ADAM = "signed-adam"  # Adam fed the sign of the gradient


class LabelStrategy(StrEnum):
    JOINT = "joint"  # soft labels optimised with the images
    ANALYTIC = "analytic"  # recovered from the update first, then fixed


@dataclass(frozen=True)
class AttackConfig:
    """An attack is a preset of (objective, optimizer, label strategy, prior); the registered ones are
    `AttackSpec.preset`s (fl_sim/contract/attacks.py)."""

    name: str
    objective: Objective
    optimizer: Optimizer
    labels: LabelStrategy
    tv_weight: float = 0.0  # total-variation prior on the images
    box: bool = False  # project pixels onto [0, 1] after every step
    lr: float = 1.0  # step size of the optimizer
    lr_decay: bool = False  # x0.1 at 3/8, 5/8 and 7/8 of the iterations (Inverting Gradients' schedule)
    updates_per_iteration: int = 1  # optimiser updates in one iteration (20 for L-BFGS, as the DLG code's step())
    restarts: int = 1  # random initialisations per victim; the best by the attack's own loss is kept
    max_redraws: int = 4  # re-drawn restarts per diverged restart before it is given up
    history: int = 100  # L-BFGS curvature pairs per row (torch.optim.LBFGS's default, as the DLG code)
    bn_statistics: float = 0.0  # weight of the batch-norm statistics term (GradInversion, Yin et al. 2021):
    #                           the running means and variances a train-mode client sends back against those the
    #                           replay produces; 0 ignores them
    label_assignments: int = 8  # with K > 1 and recovered labels: ways of dealing them into steps, each with
    #                             its own restarts; the best by the attack's own loss is kept
    epoch_copies: bool = False  # epochs mode: one copy of the images per epoch, the client's unknown
    #                             reshuffle (attacker/fedavg.py); off: one order for every epoch
    epoch_prior: float = 0.0  # weight of the order-free prior tying the epoch copies together
    label_path: bool = False  # label recovery counts the model's predictions along the client's steps
    #                           (labels.path_mean_softmax), not at the global weights only

    def __post_init__(self):
        for field, kind in (("objective", Objective), ("optimizer", Optimizer), ("labels", LabelStrategy)):
            try:
                object.__setattr__(self, field, kind(getattr(self, field)))
            except ValueError:
                raise ValueError(f"{field} must be one of {', '.join(kind)}, got {getattr(self, field)!r}") from None
        for field in ("bn_statistics", "epoch_prior"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be at least 0, got {getattr(self, field)}")
        for field in ("restarts", "history", "label_assignments"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")
