"""What the server knows about a client's training: the settings it sent, and the attack it runs."""
from dataclasses import dataclass, replace

BATCHNORM_MODES = ("train", "frozen")


@dataclass(frozen=True)
class TrainingSettings:
    """The local training the server configured, which it therefore knows.

    A client runs `epochs` passes over its K x B round examples, `local_steps` (K) SGD steps per pass,
    each on its own batch of `batch_size` (B) examples in a fixed order, with learning rate `lr` and
    optional heavy-ball `momentum` (torch.optim.SGD semantics). K = 1, epochs = 1 is FedSGD.
    `batchnorm` says how batch-norm layers behave in local training: "train" normalises each batch by
    its own statistics (PyTorch's train mode), "frozen" uses the model's running statistics and leaves
    them as they are (eval mode for those layers only; their weights still train), as when fine-tuning,
    and as the Inverting Gradients paper computes its target gradients.
    """

    lr: float
    local_steps: int = 1
    batch_size: int = 1
    epochs: int = 1
    momentum: float = 0.0
    batchnorm: str = "train"

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("local_steps", "batch_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {self.batchnorm!r}")

    @property
    def num_images(self) -> int:
        """How many distinct images stand behind one update."""
        return self.local_steps * self.batch_size

    @property
    def total_steps(self) -> int:
        return self.local_steps * self.epochs

    def as_single_gradient(self) -> "TrainingSettings":
        """The naive view (`--no-replay`): the update divided by (steps x lr) as one gradient of all images.

        One step with learning rate steps x lr on one batch of all K x B images yields exactly that.
        """
        return replace(self, lr=self.lr * self.total_steps, local_steps=1, epochs=1,
                       batch_size=self.num_images, momentum=0.0)


@dataclass(frozen=True)
class AttackConfig:
    """An attack is a preset of (objective, optimizer, label strategy, prior); see PRESETS."""

    name: str
    objective: str  # "l2": squared distance of updates | "cosine": 1 - cosine similarity
    optimizer: str  # "lbfgs" | "adam" | "signed-adam" (Adam fed the sign of the gradient)
    labels: str  # "joint": soft labels optimised with the images | "analytic": recovered first, then fixed
    tv_weight: float = 0.0  # total-variation prior on the images
    box: bool = False  # project pixels onto [0, 1] after every step
    lr: float = 1.0  # step size of the optimizer
    lr_decay: bool = False  # x0.1 at 3/8, 5/8 and 7/8 of the iterations (Inverting Gradients' schedule)
    updates_per_iteration: int = 1  # optimiser updates in one iteration (20 for L-BFGS, as the DLG code's step())
    restarts: int = 1  # random initialisations per victim; the best by the attack's own loss is kept
    max_redraws: int = 4  # re-drawn restarts per diverged restart before it is given up
    history: int = 100  # L-BFGS curvature pairs per row (torch.optim.LBFGS's default, as the DLG code)
    label_assignments: int = 8  # with K > 1 and recovered labels: ways of dealing them into steps, each with
    #                             its own restarts; the best by the attack's own loss is kept

    def __post_init__(self):
        checks = {"objective": ("l2", "cosine"), "optimizer": ("lbfgs", "adam", "signed-adam"),
                  "labels": ("joint", "analytic")}
        for field, allowed in checks.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field in ("restarts", "history", "label_assignments"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")


PRESETS: dict[str, AttackConfig] = {
    # Zhu et al. 2019: squared gradient distance, L-BFGS, labels learnt jointly as soft labels.
    "dlg": AttackConfig("dlg", objective="l2", optimizer="lbfgs", labels="joint", updates_per_iteration=20,
                        restarts=2),
    # Zhao et al. 2020: the label read off the last layer's gradient, then DLG's optimisation.
    "idlg": AttackConfig("idlg", objective="l2", optimizer="lbfgs", labels="analytic", updates_per_iteration=20,
                         restarts=2),
    # Geiping et al. 2020: cosine distance, TV prior, signed Adam with step decay, pixels boxed to [0, 1].
    "ig": AttackConfig("ig", objective="cosine", optimizer="signed-adam", labels="analytic", tv_weight=1e-2,
                       box=True, lr=0.1, lr_decay=True, restarts=1),
}


def get_attack(name: str, **overrides) -> AttackConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown attack {name!r}: choose one of {', '.join(PRESETS)}")
    overrides = {key: value for key, value in overrides.items() if value is not None}
    return replace(PRESETS[name], **overrides)
