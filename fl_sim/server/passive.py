"""The honest-but-curious server's attacks (dlg, idlg, ig, fedavg): optimisation-based inversion of the updates it gets.

It sends everyone the global model and changes nothing in the average; it replays each victim's local
training on candidate images (attacker/engine.py) until the replayed update matches the observed one.
`replay=False` (`--no-replay`) attacks as if the update were one gradient (TrainingSettings.as_single_gradient)
instead of replaying the client's local steps.
"""
from collections.abc import Sequence
from typing import Self

import torch
from torch import nn

from attacker import AttackConfig, Reconstruction, get_attack, invert
from fl_sim.server.attacks import Armed, Attack, AttackContext, Observed, SettingValue


class PassiveInversion(Attack):
    """A passive attack's registered preset (AttackSpec.preset: objective, optimiser, labels, prior) run by the
    inversion engine."""

    def __init__(self, model: nn.Module, preset: AttackConfig, image_shape: tuple[int, int, int], num_classes: int,
                 iterations: int, *, replay: bool = True, device: str | torch.device = "auto", progress: bool = False,
                 victims_at_once: int | None = None):
        self.model, self.preset, self.image_shape, self.num_classes = model, preset, image_shape, num_classes
        self.iterations, self.replay, self.device, self.progress = iterations, replay, device, progress
        self.victims_at_once = victims_at_once
        self.name = preset.name

    @classmethod
    def build(cls, context: AttackContext) -> Self:
        config = context.config
        preset = get_attack(context.name, restarts=config.restarts, bn_statistics=config.bn_statistics,
                            tv_weight=config.tv_weight, label_assignments=config.label_deals)
        return cls(context.model, preset, context.image_shape, context.num_classes, config.iterations,
                   replay=not config.no_replay, device=context.device, progress=context.progress,
                   victims_at_once=context.victims_at_once)

    def read(self, observed: Sequence[Observed], armed: Armed | None, seed: int) -> list[Reconstruction]:
        settings = observed[0].settings if self.replay else observed[0].settings.as_single_gradient()
        cap = self.victims_at_once and self.victims_at_once * self.preset.restarts
        victim_ids = [each.victim.seed_key for each in observed]
        return invert(self.model, observed[0].sent, [each.update for each in observed], settings, self.preset,
                      image_shape=self.image_shape, num_classes=self.num_classes, iterations=self.iterations,
                      seed=seed, victim_ids=victim_ids, device=self.device,
                      progress=self.progress, max_rows=cap)

    def resolved(self) -> dict[str, SettingValue]:
        return {"iterations": self.iterations, "restarts": self.preset.restarts,
                "label_deals": self.preset.label_assignments,
                "bn_statistics": self.preset.bn_statistics, "tv_weight": self.preset.tv_weight}
