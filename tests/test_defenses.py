"""Client-side defenses (clients/defenses.py): each step does what it says, bad specs are refused, the
ClientApp sends the defended update, and a Flower run carries it to the server (with secagg-emulated, only the sum;
the real protocol's: tests/test_secagg.py)."""
import dataclasses
import json
import math

import pytest
import torch
from flower_helpers import lenet, node_context, plain_config, train_message
from flwr.clientapp.mod import LocalDpMod

from attacker import TrainingSettings
from clients.app import make_client_app
from clients.defenses import defend, defense_seed, sent_weights
from fl_sim.commands import cli
from fl_sim.contract.defenses import DefenseKind, DefenseSpec
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import partition_indices, round_examples
from fl_sim.results.outputs import read_jsonl
from fl_sim.server.resume import load_checkpoint


def change_of(*shapes, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(shape, generator=generator) for i, shape in enumerate(shapes)}


def norm(change) -> float:
    return math.sqrt(sum(float((tensor.double() ** 2).sum()) for tensor in change.values()))


def test_prune_zeroes_exactly_the_smallest_fraction_of_each_tensor():
    change = change_of((40, 25), (10,), (7,))
    pruned = defend(DefenseSpec.parse("prune:0.9"), change, seed=0)
    for name, tensor in change.items():
        dropped = round(0.9 * tensor.numel())
        kept = pruned[name] != 0
        assert int((~kept).sum()) == dropped
        assert torch.equal(pruned[name][kept], tensor[kept])  # the rest is sent as it is
        if dropped:
            assert tensor[~kept].abs().max() <= tensor[kept].abs().min()  # and it is the largest entries


def test_clip_bounds_the_whole_updates_norm_and_keeps_its_direction():
    change = change_of((30, 30), (30,))
    assert norm(change) > 10
    clipped = defend(DefenseSpec.parse("clip:2"), change, seed=0)
    assert norm(clipped) == pytest.approx(2, rel=1e-6)
    scale = clipped["layer0"][0, 0] / change["layer0"][0, 0]
    for name in change:
        torch.testing.assert_close(clipped[name], change[name] * scale)
    short = {name: tensor / 100 for name, tensor in change.items()}
    clipped = defend(DefenseSpec.parse("clip:2"), short, 0)
    assert all(torch.equal(a, b) for a, b in zip(clipped.values(), short.values()))


def test_noise_has_the_asked_std_and_is_fixed_by_the_seed():
    zeros = {"w": torch.zeros(400, 500), "b": torch.zeros(1000)}
    noisy = defend(DefenseSpec.parse("noise:0.1"), zeros, seed=3)
    values = torch.cat([tensor.flatten() for tensor in noisy.values()])
    assert values.std().item() == pytest.approx(0.1, rel=0.01) and abs(values.mean().item()) < 1e-3
    again = defend(DefenseSpec.parse("noise:0.1"), zeros, seed=3)
    other = defend(DefenseSpec.parse("noise:0.1"), zeros, seed=4)
    assert torch.equal(noisy["w"], again["w"]) and not torch.equal(noisy["w"], other["w"])
    assert defense_seed(0, 1, 2) != defense_seed(0, 2, 1)  # clients and rounds draw their own noise


def test_fp16_sends_what_half_precision_keeps():
    change = change_of((50, 50))
    change["layer0"][0, :3] = torch.tensor([1e-9, 70000.0, 0.25])  # below fp16's range, above it, exact in fp16
    sent = defend(DefenseSpec.parse("fp16"), change, seed=0)["layer0"]
    assert sent.dtype == torch.float32
    assert torch.equal(sent, change["layer0"].half().float())
    assert sent[0, 0] == 0 and sent[0, 1] == math.inf and sent[0, 2] == 0.25
    rest = change["layer0"][1:]
    assert ((sent[1:] - rest).abs() <= rest.abs() * 2 ** -11 + 2 ** -25).all()  # fp16's rounding error


def test_steps_run_in_the_order_written():
    change = change_of((100, 100))
    assert norm(defend(DefenseSpec.parse("noise:1+clip:3"), change, seed=0)) == pytest.approx(3, rel=1e-6)
    assert norm(defend(DefenseSpec.parse("clip:3+noise:1"), change, seed=0)) > 50


def test_specs_parse_into_client_steps_and_secure_aggregation():
    assert DefenseSpec.parse("none") == DefenseSpec()
    assert DefenseSpec.parse("clip:4+noise:0.01") == DefenseSpec(((DefenseKind.CLIP, 4.0), (DefenseKind.NOISE, 0.01)))
    assert DefenseSpec.parse("secagg") == DefenseSpec((), secure_aggregation=True)
    spec = DefenseSpec.parse("prune:0+fp16+secagg")
    assert spec == DefenseSpec(((DefenseKind.PRUNE, 0.0), (DefenseKind.FP16, None)), True)
    assert DefenseSpec.parse(str(spec)) == spec and str(DefenseSpec.parse("clip:4+noise:0.01")) == "clip:4+noise:0.01"


@pytest.mark.parametrize("spec,message", [
    ("noise:abc", "noise needs SIGMA, a positive number, got 'abc'"),
    ("noise:0", "noise needs SIGMA"),
    ("noise:nan", "noise needs SIGMA"),
    ("noise", "noise needs SIGMA, a positive number, got ''"),
    ("clip:-1", "clip needs C, a positive number"),
    ("clip:inf", "clip needs C"),
    ("prune:1.5", "prune needs P, a fraction in [0, 1)"),
    ("prune:1", "1 would send no update"),
    ("fp16:2", "fp16 takes no number"),
    ("secagg:2", "secagg takes no number"),
    ("secagg-emulated:2", "secagg-emulated takes no number"),
    ("secagg+secagg", "comes once"),
    ("none+fp16", "'none' means no defense and stands alone; to defend, join only the steps, e.g. fp16"),
    ("blur:3", "'blur:3' is not a defense; write steps joined by '+'"),
    ("", "'' is not a defense"),
])
def test_bad_specs_are_refused_in_one_sentence(spec, message):
    with pytest.raises(ConfigError, match="--defense") as error:
        DefenseSpec.parse(spec)
    assert message in str(error.value)


def test_only_parameters_change_and_without_client_steps_nothing_does():
    global_weights = {"w": torch.zeros(10), "running_mean": torch.zeros(3)}
    trained = {"w": torch.linspace(-1, 1, 10), "running_mean": torch.ones(3)}
    for spec in ("none", "secagg", "secagg-emulated"):
        assert sent_weights(DefenseSpec.parse(spec), global_weights, trained, ["w"], seed=0) is trained
    sent = sent_weights(DefenseSpec.parse("prune:0.5"), global_weights, trained, ["w"], seed=0)
    assert int((sent["w"] == 0).sum()) == 5 and torch.equal(sent["running_mean"], trained["running_mean"])


def test_a_secure_aggregate_is_attacked_as_one_client_with_every_batch():
    settings = TrainingSettings(lr=0.1, local_steps=2, batch_size=3)
    assert settings.for_mean_of(4) == TrainingSettings(lr=0.1, local_steps=2, batch_size=12)


TRAINING = TrainingSettings(lr=0.1, local_steps=2, batch_size=2)


@pytest.fixture(scope="module")
def config(shared_data, tmp_path_factory):
    return plain_config(out=str(tmp_path_factory.mktemp("out")), num_clients=2, data_root=str(shared_data),
                     train_mode="steps", batch_size=1, model="lenet")


@pytest.mark.usefixtures("server_identity")
def test_the_clients_clip_is_flowers_local_dp_clipping(config):
    """`clip:C` sends what Flower's LocalDpMod sends with clipping norm C and no noise (sensitivity 0)."""
    weights = lenet().state_dict()
    message = train_message(weights, TRAINING, server_round=1)
    plain = make_client_app(config)
    by_flower = LocalDpMod(clipping_norm=0.5, sensitivity=0.0, epsilon=1.0, delta=1e-5)(
        message, node_context(0, 2), plain)
    ours = make_client_app(dataclasses.replace(config, defense="clip:0.5"))(message, node_context(0, 2))
    theirs, sent = by_flower.content["arrays"].to_torch_state_dict(), ours.content["arrays"].to_torch_state_dict()
    for name in weights:
        torch.testing.assert_close(sent[name], theirs[name])
    assert norm({name: sent[name] - weights[name] for name in weights}) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.usefixtures("server_identity")
def test_the_client_app_sends_the_defended_update(config):
    weights = lenet().state_dict()
    app = make_client_app(dataclasses.replace(config, defense="prune:0.9"))
    sent = app(train_message(weights, TRAINING, server_round=1), node_context(1, 2)).content["arrays"]
    for name, tensor in sent.to_torch_state_dict().items():
        changed = int((tensor != weights[name]).sum())
        assert 0 < changed <= tensor.numel() - round(0.9 * tensor.numel()), name


def test_a_flower_run_carries_the_defense_to_the_server_and_secagg_shows_it_only_the_sum(shared_data, tmp_path):
    """Ray simulation, 2 clients, 1 round: the new global model moved in at most 2 x 10% of each tensor's
    entries (both clients pruned 90%), and the attack had one victim: the aggregate of both clients. Emulated
    secure aggregation: SecAgg+'s stochastic quantization would move every entry (tests/test_secagg.py runs it).
    IG, boxed: unboxed iDLG's pixels run off on a pruned update, and a diverged victim has no images to check."""
    out = tmp_path / "run"
    assert cli.main(["run", "--train-mode", "steps", "--batch-size", "1", "--model", "lenet", "--dataset", "mnist",
                     "--data-root", str(shared_data), "--num-clients", "2",
                     "--rounds", "1", "--attack", "ig", "--restarts", "1", "--iterations", "3", "--seed", "1",
                     "--defense", "prune:0.9+secagg-emulated", "--device", "cpu", "--max-shard", "0",
                     "--out", str(out)]) == 0
    initial = build_model("lenet", 1, 28, 10, init="default", seed=1).state_dict()
    after = load_checkpoint(out).weights
    for name, tensor in initial.items():
        assert 0 < int((after[name] != tensor).sum()) <= 2 * (tensor.numel() - round(0.9 * tensor.numel())), name

    [row] = read_jsonl(out / "metrics.jsonl")
    assert (row["round"], row["client"], row["clients"], row["status"]) == (1, "aggregate", [0, 1], "ok")
    train = load_dataset("mnist", shared_data, train=True)
    partitions = partition_indices(train.labels, 2, seed=1)
    assert row["true_labels"] == [int(train.tensors(round_examples(partitions[client], 1, 1, client, 1))[1])
                                  for client in (0, 1)]
    assert len(row["psnr_images"]) == 2  # one attack on a batch of both clients' images
    assert (out / "round-001" / "aggregate" / "reconstruction.png").is_file()
    assert "round-001/aggregate/reconstruction.png" in (out / "gallery.html").read_text()
    assert json.loads((out / "run.json").read_text())["config"]["defense"] == "prune:0.9+secagg-emulated"


@pytest.mark.usefixtures("server_identity")
def test_flowers_client_app_runs_the_defense_as_a_mod_read_from_the_run_config(shared_data):
    """`flwr run` loads clients.app:app, built before any run config exists: its mods read `defense` per message."""
    from clients.app import app
    from clients.mods import DefenseMod, DetectMod, FaultMod, FlowerDpMods, InspectMod
    from clients.secagg import SecAggPlusMod
    from clients.transport import ExpandRowsMod

    assert [type(mod) for mod in app._mods] == [ExpandRowsMod, SecAggPlusMod, FaultMod, DetectMod, InspectMod,
                                                FlowerDpMods, DefenseMod]
    weights = lenet().state_dict()
    base = {"data-root": str(shared_data), "num-clients": 2, "model": "lenet", "attack": "idlg"}
    replies = {spec: app(train_message(weights, TRAINING, server_round=1),
                         node_context(1, 2, run_config={**base, "defense": spec})).content["arrays"]
               for spec in ("none", "prune:0.9")}
    plain, pruned = (replies[spec].to_torch_state_dict()["classifier.weight"] for spec in ("none", "prune:0.9"))
    start = weights["classifier.weight"]
    assert int((plain != start).sum()) > 0.5 * start.numel()
    assert int((pruned != start).sum()) <= start.numel() - round(0.9 * start.numel())
