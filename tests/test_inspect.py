"""`--defense inspect`: clients check the model they are sent (clients/inspection.py) and refuse or flag it.

An honest model passes, fresh and trained; imprint and trap models are caught; a refusal is an error reply the
server records as refused, and the round goes on; flag mode's metric reaches metrics.jsonl, through Flower's
context.state across rounds of a real simulation; the quiet trap (the evader) passes.
"""
import pytest
import torch
from flower_helpers import node_context, train_message, trap_round
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from clients.inspection import Architecture, inspect_model, mask_of
from clients.mods import PASSED, InspectMod
from clients.training import local_train
from fl_sim.commands import cli
from fl_sim.contract.defenses import DefenseSpec, InspectionMode
from fl_sim.contract.protocol import (
    INSPECT_FLAGS,
    INSPECTION_REFUSED,
    METRICS,
    InspectionCheck,
    TrainingSettings,
    inspection_labels,
)
from fl_sim.contract.records import FLAGGED, ReplyStatus
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.data import cached_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weights
from fl_sim.results.outputs import read_jsonl
from fl_sim.server.active import ImprintAttack, QuietTrapAttack, TrapAttack, public_images

DECLARED = TrainingSettings(lr=0.05, batch_size=16, momentum=0.9)
pytestmark = pytest.mark.usefixtures("server_identity")


def cnn_mnist(**options) -> torch.nn.Module:
    return build_model("cnn", 1, 28, 10, **options)


def trained(model: torch.nn.Module, shared_data, steps: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model after `steps` real SGD steps on MNIST (what a round of FedAvg sends next)."""
    data = cached_dataset("mnist", str(shared_data), True)
    images, labels = data.tensors(list(range(seed * 64, seed * 64 + 16 * steps)))
    local_train(model, images, labels, TrainingSettings(lr=0.05, local_steps=steps, batch_size=16, momentum=0.9))
    return weights(model)


def test_defense_specs_name_the_inspection_mode():
    assert DefenseSpec.parse("inspect").inspection == InspectionMode.REFUSE
    spec = DefenseSpec.parse("inspect:flag+clip:4")
    assert spec.inspection == InspectionMode.FLAG and spec.steps == (("clip", 4.0),)
    assert DefenseSpec.parse(str(spec)) == spec
    assert DefenseSpec.parse("none").inspection is None
    for bad in ("inspect:maybe", "inspect+inspect:flag"):
        with pytest.raises(ConfigError, match="inspect comes once"):
            DefenseSpec.parse(bad)


@pytest.mark.parametrize("name, channels, size", [("cnn", 1, 28), ("lenet", 3, 32), ("resnet20", 3, 32)])
def test_a_fresh_model_of_the_registry_passes(name, channels, size):
    model = build_model(name, channels, size, 10, seed=3)
    assert inspect_model(weights(model), Architecture.of(build_model(name, channels, size, 10))) == []


def test_an_honest_round_of_training_passes_against_the_model_before(shared_data):
    model = cnn_mnist(seed=1)
    before = weights(model)
    after = trained(model, shared_data)
    assert inspect_model(after, Architecture.of(cnn_mnist()), before) == []


def test_the_imprint_block_is_not_the_announced_architecture(shared_data):
    honest = Architecture.of(cnn_mnist())
    test = cached_dataset("mnist", str(shared_data), False)
    attack = ImprintAttack(cnn_mnist(imprint=64), public_images(test, 256), 10, 4)
    armed, _ = attack.surgery(weights(attack.model), DECLARED)
    [finding] = inspect_model(armed, honest)
    assert finding.check == InspectionCheck.ARCHITECTURE and "imprint.bias" in finding.detail


def test_trap_weights_are_caught_by_their_zeros_and_a_jump_from_the_last_model(shared_data):
    honest = Architecture.of(cnn_mnist())
    global_weights = weights(cnn_mnist(seed=2))
    test = cached_dataset("mnist", str(shared_data), False)
    armed, _ = TrapAttack(cnn_mnist(), public_images(test, 256), 10).surgery(global_weights, DECLARED)
    failed = {finding.check for finding in inspect_model(armed, honest, global_weights)}
    assert {InspectionCheck.ZERO_ENTRIES, InspectionCheck.ZERO_BIAS, InspectionCheck.DUPLICATE_ROWS,
            InspectionCheck.JUMP} <= failed
    # the MLP's trap touches one layer, and leaves its biases zero
    mlp = build_model("mlp", 1, 28, 10)
    armed, _ = TrapAttack(mlp, public_images(test, 256), 10).surgery(weights(mlp), DECLARED)
    assert InspectionCheck.ZERO_BIAS in {finding.check for finding in inspect_model(armed, Architecture.of(mlp))}


def test_a_layer_left_as_it_was_while_the_rest_trained_is_frozen(shared_data):
    model = cnn_mnist(seed=1)
    before = weights(model)
    after = trained(model, shared_data)
    after["classifier.0.weight"] = before["classifier.0.weight"].clone()
    assert mask_of(inspect_model(after, Architecture.of(cnn_mnist()), before)) == InspectionCheck.FROZEN
    assert inspection_labels(InspectionCheck.FROZEN | InspectionCheck.JUMP) == ["jump", "frozen"]


def test_the_quiet_trap_passes_through_the_mlp_in_its_first_round_and_after(shared_data):
    mlp = build_model("mlp", 1, 28, 10)
    honest = Architecture.of(mlp)
    test = cached_dataset("mnist", str(shared_data), False)
    attack = QuietTrapAttack(mlp, public_images(test, 256), 10)
    first = weights(build_model("mlp", 1, 28, 10, seed=2))
    armed, _ = attack.surgery(first, DECLARED)
    assert inspect_model(armed, honest) == []
    again, _ = attack.surgery(trained(build_model("mlp", 1, 28, 10, seed=2), shared_data), DECLARED)
    assert inspect_model(again, honest, armed) == []  # the federation trained on; the trap rows moved with it
    assert {finding.check for finding in inspect_model(armed, honest, first)} == {InspectionCheck.JUMP}


def test_the_quiet_trap_cannot_hide_the_convnets_pass_through_taps(shared_data):
    test = cached_dataset("mnist", str(shared_data), False)
    attack = QuietTrapAttack(cnn_mnist(), public_images(test, 256), 10)
    armed, _ = attack.surgery(weights(cnn_mnist(seed=2)), DECLARED)
    assert float(armed["features.0.weight"][0, 0, 1, 1]) == pytest.approx(1.0, abs=1e-3)  # the tap, under noise
    assert {finding.check for finding in inspect_model(armed, Architecture.of(cnn_mnist()))} == \
        {InspectionCheck.PEAKED}


def test_the_mod_keeps_the_last_passed_model_in_the_context_state(shared_data):
    config = RunConfig(out="unused", data_root=str(shared_data), model="cnn", defense="inspect:flag", attack="none")
    context = node_context(0, 2)
    mod, replies = InspectMod(config), []

    def train(msg, ctx):
        replies.append(msg)
        return _reply(msg)

    honest = weights(cnn_mnist(seed=4))
    mod(train_message(honest, DECLARED, 1), context, train)
    assert torch.equal(context.state.array_records[PASSED].to_torch_state_dict()["features.0.weight"],
                       honest["features.0.weight"])
    moved = {name: tensor * 1.01 for name, tensor in honest.items()}  # a round's small change everywhere ...
    jumped = {**moved, "classifier.0.weight": -honest["classifier.0.weight"]}  # ... and one layer turned around
    reply = mod(train_message(jumped, DECLARED, 2), context, train)
    assert reply.content[METRICS][INSPECT_FLAGS] == InspectionCheck.JUMP
    assert len(replies) == 2  # flag mode trains all the same
    assert torch.equal(context.state.array_records[PASSED].to_torch_state_dict()["classifier.0.weight"],
                       honest["classifier.0.weight"])  # a model that failed never becomes the reference


def _reply(msg: Message) -> Message:
    """What the ClientApp would reply, without training (the mod's tests need only its shape)."""
    return Message(RecordDict({"arrays": msg.content["arrays"], METRICS: MetricRecord({"train-loss": 1.0})}),
                   reply_to=msg)


def test_a_refusal_is_recorded_and_the_round_goes_on(shared_data):
    """Client 0 is sent trap weights and refuses; client 1 trains; FedAvg averages client 1 alone."""
    config = RunConfig(out="unused", data_root=str(shared_data), model="cnn", num_clients=2, defense="inspect",
                       attack="trap", train_mode="steps", batch_size=4, lr=0.05, momentum=0.0)
    test = cached_dataset("mnist", str(shared_data), False)
    strategy, recorder, replies = trap_round(config, cnn_mnist, public_images(test, 256))
    refused = next(reply for reply in replies if reply.metadata.src_node_id == 100)
    assert refused.has_error() and refused.error.code == INSPECTION_REFUSED
    assert "client 0 refused the model it was sent (inspect): zero-entries" in refused.error.reason

    arrays, _ = strategy.aggregate_train(1, replies)

    [(server_round, fault)] = recorder.faults
    assert (server_round, fault.client, fault.status) == (1, 0, ReplyStatus.REFUSED)
    assert fault.reason.startswith("refused: client 0 refused the model it was sent (inspect): zero-entries")
    assert list(recorder) == []  # the refusing target sent no update to attack
    client1 = next(reply for reply in replies if reply.metadata.src_node_id == 101)
    assert torch.equal(arrays.to_torch_state_dict()["classifier.0.weight"],
                       client1.content["arrays"].to_torch_state_dict()["classifier.0.weight"])
    assert refused.metadata.message_type == MessageType.TRAIN


def test_flags_reach_metrics_jsonl_across_rounds_of_a_real_simulation(shared_data, tmp_path):
    """The quiet trap arms client 0 in round 1 (it passes, and becomes the client's reference in context.state);
    round 2 sends it the honest model, which jumped away from that reference: flagged in a row of its own."""
    out = tmp_path / "run"
    flags = ["run", "--model", "mlp", "--dataset", "mnist", "--data-root", str(shared_data), "--num-clients", "2",
             "--rounds", "2", "--train-mode", "steps", "--batch-size", "4", "--attack", "trap-quiet",
             "--attack-clients", "0", "--attack-every", "2", "--defense", "inspect:flag", "--seed", "1",
             "--out", str(out)]
    assert cli.main(flags) == 0
    rows = {(row["round"], row["client"]): row for row in read_jsonl(out / "metrics.jsonl")}
    assert sorted(rows) == [(1, 0), (2, 0)]
    assert rows[1, 0]["status"] == "ok" and rows[1, 0]["inspect_flags"] == []  # the evader passed
    assert rows[2, 0]["status"] == FLAGGED and "jump" in rows[2, 0]["inspect_flags"]


def test_fl_sim_attack_victims_refuse_or_flag_trap_weights(shared_data, tmp_path, capsys):
    common = ["attack", "--attack", "trap", "--model", "mlp", "--dataset", "mnist", "--data-root", str(shared_data),
              "--batch-size", "8", "--num-victims", "2", "--seed", "0"]
    assert cli.main([*common, "--defense", "inspect", "--out", str(tmp_path / "refuse")]) == 3
    assert "every victim refused the model it was sent" in capsys.readouterr().out
    rows = read_jsonl(tmp_path / "refuse" / "metrics.jsonl")
    assert [(row["victim"], row["status"]) for row in rows] == [(0, ReplyStatus.REFUSED), (1, ReplyStatus.REFUSED)]
    # the ClientApp's own refusal (InspectMod), which the victim sends back
    assert rows[0]["reason"] == "client 0 refused the model it was sent (inspect): zero-bias: layers.1.bias is zero " \
        "everywhere"
    assert cli.main([*common, "--defense", "inspect:flag", "--out", str(tmp_path / "flag")]) == 0
    rows = read_jsonl(tmp_path / "flag" / "metrics.jsonl")
    assert [(row["status"], row["inspect_flags"]) for row in rows] == [("ok", ["zero-bias"])] * 2
