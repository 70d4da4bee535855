"""The attack registry and the one Attack interface: an attack defined here (one class, one registry entry) runs
through `fl-sim run` and `fl-sim attack` with no other file changed; the analytic readout's error rows are typed."""
import json
from collections.abc import Sequence

import pytest
import torch

from attacker import Reconstruction, Status
from attacker.analytic import TrapReadout, recover
from fl_sim.commands import cli
from fl_sim.contract.attacks import AttackKind, AttackSpec, attack_names, register, unregister
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.updates import Weights
from fl_sim.results.outputs import read_jsonl
from fl_sim.server.attacks import Armed, Attack, AttackContext, Observed

NUDGE = 1e-3  # what the toy server adds to every weight it sends its targets


class NudgeAttack(Attack):
    """A toy active attack: sends each target the global weights plus NUDGE * (1 + client id), reads nothing but
    the count of images behind each update (grey images, label 0), and averages its targets' replies unchanged.
    It notes what it was asked, so the test can see the strategy and the command drive it alike."""

    name = "nudge"
    calls: list[tuple[str, object]] = []

    def __init__(self, image_shape: tuple[int, int, int]):
        self.image_shape = image_shape

    @classmethod
    def build(cls, context: AttackContext) -> "NudgeAttack":
        return cls(context.image_shape)

    def arm(self, global_weights: Weights, settings: TrainingSettings, targets: Sequence[int]) -> Armed:
        self.calls.append(("arm", tuple(targets)))
        return Armed({client: {name: tensor + NUDGE * (1 + client) if tensor.is_floating_point() else tensor
                               for name, tensor in global_weights.items()} for client in targets})

    def read(self, observed: Sequence[Observed], armed: Armed | None, seed: int) -> list[Reconstruction]:
        for each in observed:
            [client] = each.victim.clients
            assert armed is not None and each.sent is armed.weights[client]  # taken against what it was sent
            self.calls.append(("read", client))
        count = observed[0].settings.num_images
        return [Reconstruction(torch.full((count, *self.image_shape), 0.5), torch.zeros(count, dtype=torch.long), 0.0)
                for _ in observed]


@pytest.fixture
def nudge():
    """The toy attack registered for one test, then removed."""
    register(AttackSpec("nudge", AttackKind.ACTIVE, f"{__name__}:NudgeAttack", "a toy: nudged weights, grey images"))
    NudgeAttack.calls.clear()
    yield
    unregister("nudge")


def test_a_toy_attack_runs_through_fl_sim_run_and_fl_sim_attack(nudge, shared_data, tmp_path):
    assert "nudge" in attack_names()
    common = ["--dataset", "mnist", "--data-root", str(shared_data), "--model", "lenet", "--attack", "nudge",
              "--batch-size", "2", "--seed", "0", "--device", "cpu"]
    assert cli.main(["run", *common, "--train-mode", "steps", "--num-clients", "2", "--rounds", "1",
                     "--out", str(tmp_path / "run")]) == 0
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert sorted(row["client"] for row in rows) == [0, 1]
    assert all(row["status"] == "ok" and len(row["true_labels"]) == 2 for row in rows)
    assert NudgeAttack.calls == [("arm", (0, 1)), ("read", 0), ("read", 1)]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["attack"] == "nudge"

    NudgeAttack.calls.clear()
    assert cli.main(["attack", *common, "--num-victims", "3", "--out", str(tmp_path / "attack")]) == 0
    summary = json.loads((tmp_path / "attack" / "summary.json").read_text())
    assert summary["attack"] == "nudge" and summary["victims"] == 3 and summary["iterations"] is None
    assert NudgeAttack.calls == [("arm", (0, 1, 2)), ("read", 0), ("read", 1), ("read", 2)]


def test_an_unregistered_attack_is_refused_again(tmp_path):
    register(AttackSpec("nudge", AttackKind.ACTIVE, f"{__name__}:NudgeAttack", "a toy"))
    RunConfig(attack="nudge", out=str(tmp_path)).check()
    with pytest.raises(ValueError, match="registered already"):
        register(AttackSpec("nudge", AttackKind.PASSIVE, f"{__name__}:NudgeAttack", "twice"))
    unregister("nudge")
    with pytest.raises(ConfigError, match="unknown attack 'nudge'"):
        RunConfig(attack="nudge", out=str(tmp_path)).check()


def test_an_active_attack_cannot_be_registered_to_run_in_the_background():
    with pytest.raises(ValueError, match="never in the background"):
        AttackSpec("x", AttackKind.ACTIVE, "m:C", "x", may_run_async=True)


def test_an_update_the_readout_cannot_read_gets_a_typed_status_and_a_reason():
    """Once, the error text went in as the status and the reason stayed empty."""
    readout = TrapReadout("w", "b", torch.arange(4), (1, 2, 2))
    good = {"w": torch.zeros(3, 4), "b": torch.zeros(3)}
    bad, fine = recover(readout, [{"w": torch.zeros(3, 4)}, good], count=2)  # the first lacks the bias
    assert bad.status is Status.BAD_UPDATE and not bad.ok
    assert bad.reason == "KeyError: 'b'"
    assert fine.status is Status.OK
