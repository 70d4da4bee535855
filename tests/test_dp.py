"""Differential privacy: DP-SGD with Opacus (`--defense dpsgd:...`), Flower's LocalDpMod and fixedclipping_mod as
the client's mods, Flower's central DP wrappers (`--server-dp`) inside the malicious server's wrapper."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from flower_helpers import LocalGrid, Recorder, inverting_fedavg, lenet, node_context, plain_config, train_message
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from opacus import GradSampleModule
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from attacker import TrainingSettings
from clients.app import make_client_app
from clients.mods import DefenseMod, DetectMod, FaultMod, FlowerDpMods, InspectMod, TrainOnly, mods_for
from clients.privacy import spent
from clients.secagg import SecAggPlusMod
from clients.training import local_train
from fl_sim.contract.defenses import DefenseSpec, DpSgd, LocalDp, ServerDp, ServerDpSide
from fl_sim.contract.models import model_names, model_spec
from fl_sim.contract.protocol import DP_EPSILON, DP_EPSILON_ROUND, TrainMode
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import client_shards
from fl_sim.results.outputs import read_jsonl
from fl_sim.server import round as rounds
from fl_sim.server import server_app
from fl_sim.server.strategy import flower_strategy, server_dp_caveat

TRAINING = TrainingSettings(lr=0.1, local_steps=2, batch_size=2)
ROOT = Path(__file__).resolve().parents[1]
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' RDP orders (RDPAccountant's)


@pytest.fixture(scope="module")
def config(shared_data, tmp_path_factory):
    return plain_config(out=str(tmp_path_factory.mktemp("out")), num_clients=2, data_root=str(shared_data),
                        train_mode="steps", batch_size=2, local_steps=2, model="lenet")


def accountant_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """Opacus' RDP analysis, called directly: what its accountant must give for these steps."""
    rdp = compute_rdp(q=rate, noise_multiplier=noise, steps=steps, orders=ALPHAS)
    return float(get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)[0])


def test_specs_parse_print_and_round_trip():
    spec = DefenseSpec.parse("dpsgd:noise=1.1:clip=2:delta=1e-6")
    assert spec.dpsgd == DpSgd(noise=1.1, clip=2.0, delta=1e-6) and not spec.steps and not spec.client_mods
    assert DefenseSpec.parse("dpsgd:noise=0.5").dpsgd == DpSgd(0.5, 1.0, 1e-5)  # clip and delta have defaults
    both = DefenseSpec.parse("prune:0.5+ldp:clip=2:eps=8+dpsgd:noise=1")
    assert both.local_dp == LocalDp(clip=2.0, epsilon=8.0, delta=1e-5) and both.client_mods
    assert str(spec) == "dpsgd:noise=1.1:clip=2:delta=1e-06"
    for parsed in (spec, both, DefenseSpec.parse("clip:1+ldp:clip=1:eps=3:delta=0.001+secagg")):
        assert DefenseSpec.parse(str(parsed)) == parsed
    assert ServerDp.parse("client:noise=0.5:clip=3") == ServerDp(ServerDpSide.CLIENT, 0.5, 3.0)
    assert ServerDp.parse("none") == ServerDp() and str(ServerDp.parse("server:clip=1:noise=0")) == \
        "server:noise=0:clip=1"
    config = RunConfig.from_flower({"defense": "dpsgd:noise=1", "server-dp": "server:noise=1:clip=2"})
    assert config.defense.dpsgd == DpSgd(1.0) and config.server_dp.side == ServerDpSide.SERVER
    assert RunConfig.from_flower(config.to_flower()) == config


@pytest.mark.parametrize("text,message", [
    ("dpsgd:noise=1,clip=1", "join the settings with ':', not ','"),
    ("dpsgd:clip=1", "noise= is missing"),
    ("dpsgd:noise=-1", "noise must be the noise multiplier Z, a positive number, got '-1'"),
    ("dpsgd:noise=1:delta=1", "delta must be a probability in (0, 1)"),
    ("dpsgd:noise=1:noise=2", "noise is given twice"),
    ("dpsgd:noise=1:sigma=2", "'sigma=2' is not one of noise=..., clip=..., delta=..."),
    ("dpsgd:noise=1+dpsgd:noise=2", "dpsgd comes once"),
    ("ldp:clip=1", "eps= is missing"),
    ("ldp:clip=1:eps=1+prune:0.5", "ldp (Flower's LocalDpMod) acts last"),
])
def test_bad_dp_specs_are_refused_in_one_sentence(text, message):
    with pytest.raises(ConfigError, match="--defense") as error:
        DefenseSpec.parse(text)
    assert message in str(error.value)


@pytest.mark.parametrize("text", ["client", "both:noise=1:clip=1", "server:noise=1", "server:noise=1:clip=0"])
def test_bad_server_dp_is_refused(text):
    with pytest.raises(ConfigError, match="--server-dp"):
        ServerDp.parse(text)


def test_dp_sgd_refuses_models_with_batch_norm_naming_those_that_work():
    """The list of models without batch norm is the models' own truth; Opacus refuses the others, and so does the
    config, in one line. Flower's mods and wrappers run on any model."""
    for name in model_names():
        model = build_model(name, 1, 28, 10)
        has_norm = any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())
        assert has_norm == model_spec(name).batchnorm, name
    with pytest.raises(NotImplementedError):
        GradSampleModule(build_model("resnet20", 3, 32, 10))
    with pytest.raises(ConfigError, match="use --model lenet, cnn, mlp"):
        RunConfig(model="resnet20", attack="ig", defense="dpsgd:noise=1").check()
    RunConfig(model="cnn", attack="ig", defense="dpsgd:noise=1").check()
    RunConfig(model="resnet20", attack="ig", defense="ldp:clip=1:eps=1", server_dp="client:noise=1:clip=1").check()
    with pytest.raises(ConfigError, match="proximal"):
        RunConfig(model="lenet", attack="ig", defense="dpsgd:noise=1", strategy="fedprox", proximal_mu=0.1).check()


@pytest.mark.parametrize("settings,shard", [
    (TrainingSettings(lr=0.1, local_steps=3, batch_size=4), 50),
    (TrainingSettings(lr=0.1, local_steps=1, batch_size=8, epochs=2), 200),
    (TrainingSettings(lr=0.1, batch_size=16, epochs=2, mode=TrainMode.EPOCHS), 100),
])
@pytest.mark.parametrize("server_round", [1, 5])
def test_epsilon_is_opacus_accountants_for_the_steps_and_sample_rate(settings, shard, server_round):
    """Steps a round: K x E (steps mode) or ceil(n / B) x E (epochs mode); sample rate B / n; rounds 1..r: r x that."""
    dp = DpSgd(noise=0.9, clip=1.0, delta=1e-5)
    steps = (math.ceil(shard / settings.batch_size) if settings.mode == TrainMode.EPOCHS else settings.local_steps) \
        * settings.epochs
    rate = settings.batch_size / shard
    this_round, so_far = spent(dp, settings, shard, server_round)
    assert this_round == pytest.approx(accountant_epsilon(0.9, rate, steps, 1e-5), rel=1e-9)
    assert so_far == pytest.approx(accountant_epsilon(0.9, rate, steps * server_round, 1e-5), rel=1e-9)
    assert (so_far > this_round) == (server_round > 1)


def test_dp_sgd_clips_every_example_and_its_noise_is_seeded():
    """With next to no noise an update moves at most lr x C per step (each example's gradient clipped to C, the
    batch's mean then at most C); plain SGD moves far more; the same seed gives the same noisy update."""
    images, labels = torch.randn(4, 1, 28, 28), torch.arange(4)

    def change(dp: DpSgd | None, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
        model = lenet()
        start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        local_train(model, images, labels, TRAINING, dp=dp, noise_seed=seed)
        after = model.state_dict()
        assert list(after) == list(start)  # Opacus' wrapper left the model's own keys
        return math.sqrt(sum(float(((after[n] - start[n]) ** 2).sum()) for n in start)), after

    plain, _ = change(None)
    clip = 1e-3
    clipped, _ = change(DpSgd(noise=1e-9, clip=clip))
    assert clipped <= TRAINING.lr * TRAINING.local_steps * clip * (1 + 1e-3) < plain
    _, first = change(DpSgd(noise=1.0, clip=1.0), seed=7)
    _, again = change(DpSgd(noise=1.0, clip=1.0), seed=7)
    _, other = change(DpSgd(noise=1.0, clip=1.0), seed=8)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.usefixtures("server_identity")
def test_the_client_app_trains_with_opacus_and_reports_its_epsilon(config, shared_data):
    dp_config = dataclasses.replace(config, defense="dpsgd:noise=1.0:clip=1.0:delta=1e-5")
    weights = lenet().state_dict()
    reply = make_client_app(dp_config)(train_message(weights, TRAINING, server_round=3), node_context(1, 2))
    metrics = reply.content["metrics"]
    shards = client_shards(load_dataset("mnist", shared_data, True).labels, 2, "iid", config.alpha, config.seed,
                           config.min_shard, config.max_shard)
    rate, steps = TRAINING.batch_size / len(shards[1]), TRAINING.local_steps
    assert metrics[DP_EPSILON_ROUND] == pytest.approx(accountant_epsilon(1.0, rate, steps, 1e-5), rel=1e-9)
    assert metrics[DP_EPSILON] == pytest.approx(accountant_epsilon(1.0, rate, 3 * steps, 1e-5), rel=1e-9)
    plain = make_client_app(config)(train_message(weights, TRAINING, server_round=3), node_context(1, 2))
    assert DP_EPSILON not in plain.content["metrics"]
    sent, honest = (r.content["arrays"].to_torch_state_dict() for r in (reply, plain))
    assert any(not torch.allclose(sent[name], honest[name]) for name in sent)


def test_each_flag_value_that_names_flowers_code_runs_flowers_mod(config):
    """ldp is Flower's LocalDpMod, client-side server DP Flower's fixedclipping_mod; clip:C stays ours."""
    ldp = mods_for(dataclasses.replace(config, defense="fp16+ldp:clip=2:eps=4:delta=1e-4"))
    assert [type(mod) for mod in ldp] == [TrainOnly, DefenseMod]
    local_dp = ldp[0].mod
    assert isinstance(local_dp, LocalDpMod)
    assert (local_dp.clipping_norm, local_dp.sensitivity, local_dp.epsilon, local_dp.delta) == (2.0, 2.0, 4.0, 1e-4)
    clipping = mods_for(dataclasses.replace(config, server_dp="client:noise=1:clip=1", inject_faults="0=nan"))
    assert [type(mod) for mod in clipping] == [FaultMod, TrainOnly] and clipping[1].mod is fixedclipping_mod
    assert [type(mod) for mod in mods_for(dataclasses.replace(config, defense="clip:1+noise:0.1"))] == [DefenseMod]
    assert mods_for(dataclasses.replace(config, defense="dpsgd:noise=1", server_dp="server:noise=1:clip=1")) == []
    assert [type(mod) for mod in mods_for(None)] == [SecAggPlusMod, FaultMod, DetectMod, InspectMod, FlowerDpMods,
                                                     DefenseMod]


@pytest.mark.usefixtures("server_identity")
def test_flowers_local_dp_mod_acts_on_train_messages_only(config, shared_data):
    """`flwr run`'s app reads ldp from the run config; the query before round 1 passes the mod by, and the train
    reply is clipped to C and noised with LocalDpMod's standard deviation."""
    from clients.app import app

    run_config = {"data-root": str(shared_data), "num-clients": 2, "model": "lenet", "attack": "idlg",
                  "min-shard": 1, "max-shard": 0, "defense": "ldp:clip=0.5:eps=50:delta=1e-5"}
    query = Message(RecordDict(), dst_node_id=100, message_type=MessageType.QUERY)
    assert not app(query, node_context(0, 2, run_config)).has_error()
    known = make_client_app(dataclasses.replace(config, defense="ldp:clip=0.5:eps=50"))  # fl-sim run's: TrainOnly
    assert not known(query, node_context(0, 2)).has_error()
    weights = lenet().state_dict()
    reply = app(train_message(weights, TRAINING, server_round=1), node_context(0, 2, run_config))
    assert not reply.has_error()
    sent = reply.content["arrays"].to_torch_state_dict()
    noise = LocalDp(0.5, 50.0).noise_std
    change = torch.cat([(sent[name] - weights[name]).flatten() for name in weights])
    expected = math.sqrt(0.5 ** 2 + noise ** 2 * change.numel())  # clipped update plus independent noise
    assert float(change.norm()) == pytest.approx(expected, rel=0.05)


def test_server_dp_wraps_the_strategy_in_flowers_wrapper(config):
    plain = flower_strategy(config)
    assert type(plain) is FedAvg and server_dp_caveat(config) is None
    server = flower_strategy(dataclasses.replace(config, server_dp="server:noise=0.7:clip=3"))
    assert isinstance(server, DifferentialPrivacyServerSideFixedClipping) and type(server.strategy) is FedAvg
    assert (server.noise_multiplier, server.clipping_norm, server.num_sampled_clients) == (0.7, 3.0, 2)
    client_side = dataclasses.replace(config, server_dp="client:noise=1:clip=2")
    assert isinstance(flower_strategy(client_side), DifferentialPrivacyClientSideFixedClipping)
    assert "a malicious server skips it" in server_dp_caveat(client_side) and "fixedclipping_mod" in \
        server_dp_caveat(client_side)


@pytest.mark.usefixtures("server_identity")
def test_the_malicious_wrapper_reads_the_replies_before_flowers_server_side_clipping(config, monkeypatch):
    """Server-side clipping to 0.01 (no noise) bounds the aggregate's move, yet the updates the attack was handed
    are the clients' whole updates."""
    wrapped = flower_strategy(dataclasses.replace(config, server_dp="server:noise=0:clip=0.01"))
    strategy = inverting_fedavg(Recorder(), 2, "idlg", 1, wrapped=wrapped)
    read: dict[int, float] = {}
    monkeypatch.setattr(rounds, "read_round", lambda recorder, attack, sent, reading: read.update(
        {client: math.sqrt(sum(float((change ** 2).sum()) for change in update.values()))
         for client, update in reading.updates.items()}))
    weights = lenet().state_dict()
    grid = LocalGrid(make_client_app(config), 2)
    messages = strategy.configure_train(1, ArrayRecord(weights), ConfigRecord(TRAINING.to_config()), grid)
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    aggregate = arrays.to_torch_state_dict()
    moved = math.sqrt(sum(float(((aggregate[n] - weights[n]) ** 2).sum()) for n in weights))
    assert moved <= 0.01 * (1 + 1e-4)
    assert sorted(read) == [0, 1] and min(read.values()) > 10 * 0.01


@pytest.mark.usefixtures("server_identity")
def test_a_federation_records_each_clients_epsilon_in_its_rows(config, tmp_path):
    """run_federation over a local grid (the analytic imprint attack, fast): every attacked row holds the epsilon
    its client reported, and the gallery shows it."""
    run = dataclasses.replace(config, out=str(tmp_path / "run"), rounds=2, attack="imprint", imprint_bins=32,
                              defense="dpsgd:noise=1.0:clip=1.0")
    server_app.run_federation(LocalGrid(make_client_app(run), run.num_clients), run)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    shards = client_shards(load_dataset("mnist", run.data_root, True).labels, 2, "iid", run.alpha, run.seed,
                           run.min_shard, run.max_shard)
    assert len(rows) == 4
    for row in rows:
        rate = run.batch_size / len(shards[row["client"]])
        assert row["epsilon"] == pytest.approx(accountant_epsilon(1.0, rate, 2 * row["round"], 1e-5), rel=1e-9)
        assert row["epsilon_round"] == pytest.approx(accountant_epsilon(1.0, rate, 2, 1e-5), rel=1e-9)
    assert "DP-SGD epsilon" in (tmp_path / "run" / "gallery.html").read_text()


def test_the_matrix_dp_rows_spend_the_epsilon_they_are_named_for(monkeypatch):
    """benchmarks/defense_matrix.py: the noise it picks for dpsgd-eps1 and -eps8 makes the clients' own accounting
    (clients/privacy.py) end the run at that epsilon; flags of other branches are pending, not run."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/defense_matrix.py` has it
    spec = importlib.util.spec_from_file_location("defense_matrix", ROOT / "benchmarks" / "defense_matrix.py")
    assert spec is not None and spec.loader is not None
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    for column in ("ig", "imprint"):
        settings = TrainingSettings(lr=0.1, local_steps=matrix.COLUMNS[column].local_steps,
                                    batch_size=matrix.COLUMNS[column].batch_size)
        for row, target in (("dpsgd-eps1", 1.0), ("dpsgd-eps8", 8.0)):
            flags = matrix.defense_flags(row, matrix.COLUMNS[column])
            dp = DefenseSpec.parse(flags[1]).dpsgd
            assert dp is not None
            assert spent(dp, settings, matrix.SHARD, matrix.ROUNDS)[1] == pytest.approx(target, rel=0.02)
    assert matrix.missing("none", matrix.COLUMNS["ig"]) is None
    matrix.ROWS["later"] = ["--defense", "blur:3"]
    assert matrix.missing("later", matrix.COLUMNS["ig"]) == "--defense blur:3 is not in this checkout"
    assert matrix.missing("none", matrix.Column("nonesuch", 1, 1)) == "--attack nonesuch is not in this checkout"


@pytest.mark.usefixtures("server_identity")
def test_client_side_clipping_runs_flowers_mod_with_the_norm_flowers_wrapper_sends(config, monkeypatch):
    """--server-dp client: Flower's wrapper puts C in the train config, Flower's fixedclipping_mod on each client
    clips to it, so the updates the attack reads have norm C."""
    clipped = dataclasses.replace(config, server_dp="client:noise=0:clip=0.05")
    strategy = inverting_fedavg(Recorder(), 2, "idlg", 1, wrapped=flower_strategy(clipped))
    read: dict[int, float] = {}
    monkeypatch.setattr(rounds, "read_round", lambda recorder, attack, sent, reading: read.update(
        {client: math.sqrt(sum(float((change ** 2).sum()) for change in update.values()))
         for client, update in reading.updates.items()}))
    grid = LocalGrid(make_client_app(clipped), 2)
    messages = list(strategy.configure_train(1, ArrayRecord(lenet().state_dict()), ConfigRecord(TRAINING.to_config()),
                                             grid))
    assert all(msg.content["config"]["clipping_norm"] == 0.05 for msg in messages)
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert sorted(read) == [0, 1] and all(value == pytest.approx(0.05, rel=1e-3) for value in read.values())
