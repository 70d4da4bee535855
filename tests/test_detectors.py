"""The client's detectors (clients/detectors/, fl_sim/contract/detectors.py, clients/mods.py `DetectMod`).

Every detector passes an honest model on a real batch, fresh and after training; each flags an armed model it is
made for; D-SNR follows SEER's definition; `--defense NAME[:refuse|flag]` parses through the registry (bad input:
one line, exit 2); the mod refuses or flags a model through Flower's message path, alone and in a round of a
federation.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flower_helpers import node_context, train_message, trap_round
from flwr.app import Message, MetricRecord, RecordDict

from clients.detectors import Sent, run_detector
from clients.detectors.dsnr import example_gradient_norms, layer_dsnr
from clients.detectors.lone_units import lone_unit_shares
from clients.mods import DetectMod
from clients.training import local_train
from fl_sim.commands import cli
from fl_sim.contract.defenses import DefenseSpec, InspectionMode
from fl_sim.contract.detectors import detector_names, detector_spec, detector_specs
from fl_sim.contract.protocol import INSPECT_FLAGS, INSPECTION_REFUSED, METRICS, InspectionCheck, TrainingSettings
from fl_sim.contract.records import ReplyStatus
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.data import cached_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weights
from fl_sim.server.active import ImprintAttack, public_images
from fl_sim.server.param_only import TrapAttack

DECLARED = TrainingSettings(lr=0.05, batch_size=16, momentum=0.9)
NAMES = [spec.name for spec in detector_specs()]
pytestmark = pytest.mark.usefixtures("server_identity")


def cnn(**options) -> torch.nn.Module:
    return build_model("cnn", 3, 32, 10, **options)


@pytest.fixture(scope="module")
def cifar(shared_data):
    train, test = cached_dataset("cifar10", str(shared_data), True), cached_dataset("cifar10", str(shared_data), False)
    return train, public_images(test, 512)


def batch(train, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return train.tensors(np.arange(start, start + 16))


def verdicts(received, model, images, labels, agreed=None) -> dict[str, bool]:
    sent = Sent(received, agreed or cnn(), model, images, labels)
    return {name: run_detector(name, sent).flagged for name in NAMES}


def holding(model: torch.nn.Module, received) -> torch.nn.Module:
    model.load_state_dict(received)
    return model


def test_an_honest_model_passes_every_detector_fresh_and_trained(cifar):
    train, _ = cifar
    for seed in (0, 1):
        fresh = cnn(seed=seed)
        assert verdicts(weights(fresh), fresh, *batch(train, 16 * seed)) == dict.fromkeys(NAMES, False)
    model = cnn(seed=2)
    images, labels = train.tensors(np.arange(256))
    local_train(model, images, labels, TrainingSettings(lr=0.05, local_steps=16, batch_size=16, momentum=0.9))
    assert verdicts(weights(model), model, *batch(train, 512)) == dict.fromkeys(NAMES, False)


def test_the_imprint_block_fails_the_agreed_architecture_and_size(cifar):
    train, public = cifar
    imprinted = cnn(imprint=256)
    attack = ImprintAttack(imprinted, public, 10, 4)
    block = {name: tensor for name, tensor in imprinted.state_dict().items() if not name.startswith("base.")}
    armed, _ = attack.surgery({**block, **{f"base.{name}": tensor for name, tensor in weights(cnn()).items()}},
                              DECLARED)
    flagged = verdicts(armed, holding(cnn(imprint=256), armed), *batch(train))
    assert flagged["strict-load"] and flagged["size"] and flagged["inspect"]
    sent = Sent(armed, cnn(), None)
    assert "not in the agreed model: base." in run_detector("strict-load", sent).detail
    assert run_detector("size", sent).score == pytest.approx(
        sum(t.numel() for t in armed.values()) / sum(t.numel() for t in cnn().state_dict().values()))


def test_an_entry_of_another_dtype_fails_the_strict_load_alone():
    honest = weights(cnn())
    halved = {**honest, "classifier.2.bias": honest["classifier.2.bias"].double()}
    verdict = run_detector("strict-load", Sent(halved, cnn()))
    assert verdict.flagged and verdict.detail == "other dtypes: classifier.2.bias"


def test_trap_rows_fire_for_one_example_each_and_fail_lone_units(cifar):
    train, public = cifar
    armed, _ = TrapAttack(cnn(), public, 10).surgery(weights(cnn()), DECLARED)
    images, labels = batch(train)
    flagged = verdicts(armed, holding(cnn(), armed), images, labels)
    assert flagged["lone-units"] and flagged["inspect"]
    assert not flagged["strict-load"] and not flagged["size"]  # parameter values only: the form is the agreed one
    assert lone_unit_shares(holding(cnn(), armed), images)["classifier.0"] > 0.2


def test_dsnr_flags_a_trap_that_isolates_one_image_of_the_batch(cifar):
    """Trap rows set to fire for 1 in 10 B images (fishing): a batch with one image that fires them has that
    image's gradient alone in the trap layer. (The full trap gives every image rows of its own: D-SNR, which
    looks for one image standing out, does not see it.)"""
    train, public = cifar
    attack = TrapAttack(cnn(), public, 10, fire_share=0.1)
    armed, _ = attack.surgery(weights(cnn()), DECLARED)
    model = holding(cnn(), armed)
    images, labels = train.tensors(np.arange(1024))
    layer = dict(model.named_modules())["classifier.0"]
    with torch.no_grad():
        fires = (layer(model.trap_input(images)) > 0).any(1)
    batch_of = torch.cat([torch.nonzero(fires)[:1, 0], torch.nonzero(~fires)[:15, 0]])
    verdict = run_detector("dsnr", Sent(armed, cnn(), model, images[batch_of], labels[batch_of]))
    assert verdict.flagged and verdict.detail.startswith("classifier.0")
    full, _ = TrapAttack(cnn(), public, 10).surgery(weights(cnn()), DECLARED)
    assert not run_detector("dsnr", Sent(full, cnn(), holding(cnn(), full), *batch(train))).flagged


def test_dsnr_is_seers_ratio_of_per_example_gradient_norms(cifar):
    """Each example's gradient, one backward pass of its own loss (the ConvNet has no batch norm, so the batch's
    forward pass gives each example's own gradient), per weight layer: the largest norm over the sum of the
    others', the largest over layers."""
    train, _ = cifar
    model = cnn(seed=3)
    images, labels = batch(train, 64)
    norms = example_gradient_norms(model, images, labels)
    assert set(norms) == {name for name, p in model.named_parameters() if p.dim() >= 2}
    for i in (0, 7):
        copy_ = copy.deepcopy(model)
        F.cross_entropy(copy_(images[i:i + 1]), labels[i:i + 1]).backward()
        for name, parameter in copy_.named_parameters():
            if parameter.dim() >= 2:
                assert float(norms[name][i]) == pytest.approx(float(parameter.grad.norm()), rel=1e-4)
    expected = max(float(n.max() / (n.sum() - n.max())) for n in norms.values())
    assert run_detector("dsnr", Sent(weights(model), cnn(), model, images, labels)).score == pytest.approx(expected,
                                                                                                          rel=1e-5)
    assert layer_dsnr(torch.tensor([3.0, 1.0, 2.0])) == pytest.approx(1.0, rel=1e-5)


def test_the_registry_names_the_detectors_and_defense_parses_them():
    assert NAMES[0] == "inspect" and set(detector_names()) == {"dsnr", "strict-load", "size", "lone-units"}
    assert len({spec.check for spec in detector_specs()}) == len(NAMES)  # one bit each (inspect: its own checks)
    spec = DefenseSpec.parse("dsnr:flag+size+inspect+clip:4")
    assert spec.detectors == (("dsnr", InspectionMode.FLAG), ("size", InspectionMode.REFUSE))
    assert spec.inspection == InspectionMode.REFUSE and spec.steps == (("clip", 4.0),)
    assert DefenseSpec.parse(str(spec)) == spec
    for bad, says in (("dsnr+dsnr:flag", "dsnr comes once"), ("lone-units:maybe", "lone-units comes once"),
                      ("snr", "'snr' is not a defense")):
        with pytest.raises(ConfigError, match=says) as error:
            DefenseSpec.parse(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="no detector is named 'snr'; the detectors are inspect, dsnr"):
        detector_spec("snr")


def test_a_bad_detector_name_ends_fl_sim_run_in_one_line(capsys, tmp_path):
    assert cli.main(["run", "--defense", "dsnr:sometimes", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dsnr comes once, as dsnr (refuse) or dsnr:refuse or dsnr:flag" in err


def _reply(msg: Message) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"], METRICS: MetricRecord({"train-loss": 1.0})}),
                   reply_to=msg)


def test_the_mod_refuses_or_flags_and_passes_an_honest_model(shared_data, cifar):
    _, public = cifar
    armed, _ = TrapAttack(cnn(), public, 10).surgery(weights(cnn()), DECLARED)
    trained = []

    def train(msg, ctx):
        trained.append(msg)
        return _reply(msg)

    def config(defense: str) -> RunConfig:
        return RunConfig.from_values({"out": "unused", "data_root": str(shared_data), "model": "cnn",
                                      "dataset": "cifar10", "num_clients": 2, "defense": defense, "attack": "none"})

    refused = DetectMod(config("lone-units+size"))(train_message(armed, DECLARED, 1), node_context(0, 2), train)
    assert refused.has_error() and refused.error.code == INSPECTION_REFUSED and not trained
    assert refused.error.reason.startswith("client 0 refused the model it was sent: lone-units: ")
    assert "size" not in refused.error.reason  # the trap keeps the agreed form
    mod = DetectMod(config("lone-units:flag+strict-load:flag+inspect:flag"))
    flagged = mod(train_message(armed, DECLARED, 1), node_context(0, 2), train)
    assert flagged.content[METRICS][INSPECT_FLAGS] == InspectionCheck.LONE_UNITS and len(trained) == 1
    honest = mod(train_message(weights(cnn(seed=5)), DECLARED, 1), node_context(1, 2), train)
    assert honest.content[METRICS][INSPECT_FLAGS] == 0


def test_a_refusal_in_a_round_of_a_federation(shared_data, cifar):
    """Client 0 is sent trap weights and refuses them (lone-units) through the ClientApp's own mods; client 1
    trains; the server records the refusal and averages client 1 alone."""
    _, public = cifar
    config = RunConfig(out="unused", data_root=str(shared_data), model="cnn", dataset="cifar10", num_clients=2,
                       defense="lone-units+dsnr", attack="trap", train_mode="steps", batch_size=16, lr=0.05,
                       momentum=0.0)
    strategy, recorder, replies = trap_round(config, cnn, public)
    arrays, _ = strategy.aggregate_train(1, replies)
    [(server_round, fault)] = recorder.faults
    assert (server_round, fault.client, fault.status) == (1, 0, ReplyStatus.REFUSED)
    assert "client 0 refused the model it was sent: lone-units" in fault.reason
    client1 = next(reply for reply in replies if reply.metadata.src_node_id == 101)
    assert not client1.has_error()
    assert torch.equal(arrays.to_torch_state_dict()["classifier.0.weight"],
                       client1.content["arrays"].to_torch_state_dict()["classifier.0.weight"])
