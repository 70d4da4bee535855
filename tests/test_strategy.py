"""The inverting strategy, driven round by round with real ClientApp replies (no Ray): it attacks as planned,
hands the engine the true updates, lets the strategy it wraps (FedAvg, FedAdam, ...) aggregate exactly as it
would alone, and leaves out (and records) bad replies."""
import numpy as np
import pytest
import torch
from flower_helpers import LocalGrid, Recorder, inverting_fedavg, lenet, plain_config
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from attacker import Status, TrainingSettings, invert
from clients.app import make_client_app
from fl_sim.contract.protocol import PARTITION_ID
from fl_sim.contract.records import ReplyStatus
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import load_dataset
from fl_sim.learning.partition import partition_indices, round_examples
from fl_sim.results.metrics import psnr
from fl_sim.server import passive as passive_module
from fl_sim.server.strategy import AttackPlan, ReplyFault, RoundOffset, Victim, short_error

REJECTED, CLIENT_ERROR, NO_REPLY = ReplyStatus.REJECTED, ReplyStatus.CLIENT_ERROR, ReplyStatus.NO_REPLY

DECLARED = TrainingSettings(lr=0.1, local_steps=1, batch_size=1)
CLIENTS = 2
pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.fixture(scope="module")
def config(shared_data, tmp_path_factory):
    return plain_config(out=str(tmp_path_factory.mktemp("out")), num_clients=CLIENTS, data_root=str(shared_data),
                     train_mode="steps", batch_size=1, model="lenet")


@pytest.fixture(scope="module")
def client_app(config):
    return make_client_app(config)


def strategy_with(sink, attack="idlg", iterations=1, **options):
    return inverting_fedavg(sink, CLIENTS, attack, iterations, **options)


def replies_of(strategy, client_app, weights, server_round):
    grid = LocalGrid(client_app, CLIENTS)
    return grid.send_and_receive(strategy.configure_train(server_round, ArrayRecord(weights),
                                                          ConfigRecord(DECLARED.to_config()), grid))


def test_a_round_inverts_every_client_then_aggregates_as_fedavg(config, client_app, shared_data):
    sink = Recorder()
    strategy = strategy_with(sink, iterations=5)
    weights = lenet().state_dict()
    replies = replies_of(strategy, client_app, weights, server_round=1)
    sent_back = {int(r.content["metrics"][PARTITION_ID]): r.content["arrays"].to_torch_state_dict() for r in replies}

    arrays, metrics = strategy.aggregate_train(1, replies)

    [(server_round, victims, results)] = sink
    assert server_round == 1 and victims == [Victim((0,)), Victim((1,))]
    victims = [victim.clients[0] for victim in victims]
    train = load_dataset("mnist", shared_data, train=True)
    partitions = partition_indices(train.labels, CLIENTS, seed=config.seed)
    for partition_id, result in zip(victims, results):
        images, labels = train.tensors(round_examples(partitions[partition_id], 1, config.seed, partition_id, 1))
        assert result.ok and torch.equal(result.labels, labels)
        assert psnr(result.images[0], images[0]) > 30
    average = arrays.to_torch_state_dict()
    for name in weights:
        torch.testing.assert_close(average[name], (sent_back[0][name] + sent_back[1][name]) / 2)
    assert set(metrics.keys()) == {"train-loss"}  # the routing field is not aggregated as a metric


def test_with_secure_aggregation_the_attack_sees_only_the_mean_update(client_app, shared_data, config, monkeypatch):
    """The engine gets one update, the clients' mean, with a batch of both clients' examples; FedAvg is unchanged."""
    seen = []

    def spy(model, global_params, updates, settings, attack, **options):
        seen.append((updates, settings, options["victim_ids"]))
        return invert(model, global_params, updates, settings, attack, **options)

    monkeypatch.setattr(passive_module, "invert", spy)
    sink = Recorder()
    strategy = strategy_with(sink, iterations=5, secure_aggregation=True)
    weights = lenet().state_dict()
    replies = replies_of(strategy, client_app, weights, server_round=1)
    sent_back = [r.content["arrays"].to_torch_state_dict() for r in replies]

    arrays, _ = strategy.aggregate_train(1, replies)

    [(updates, settings, victim_ids)] = seen
    assert victim_ids == [(0, 1)] and settings == TrainingSettings(lr=0.1, local_steps=1, batch_size=2)
    [update] = updates
    for name in update:
        torch.testing.assert_close(update[name], (sent_back[0][name] + sent_back[1][name]) / 2 - weights[name])
        torch.testing.assert_close(arrays.to_torch_state_dict()[name], (sent_back[0][name] + sent_back[1][name]) / 2)
    [(server_round, victims, [result])] = sink
    assert (server_round, victims) == (1, [Victim((0, 1), secure_aggregate=True)])
    assert result.images.shape == (2, 1, 28, 28)
    train = load_dataset("mnist", shared_data, train=True)
    partitions = partition_indices(train.labels, CLIENTS, seed=config.seed)
    labels = [int(train.tensors(round_examples(partitions[p], 1, config.seed, p, 1))[1]) for p in (0, 1)]
    assert sorted(result.labels.tolist()) == sorted(labels)  # the aggregate still gives the labels away


def test_the_plan_picks_rounds_and_clients(client_app):
    sink = Recorder()
    strategy = strategy_with(sink, plan=AttackPlan(every=2, clients=frozenset({1})))
    weights = lenet().state_dict()
    for server_round in (1, 2, 3):
        arrays, _ = strategy.aggregate_train(server_round, replies_of(strategy, client_app, weights, server_round))
        weights = arrays.to_torch_state_dict()
    assert [(server_round, victims) for server_round, victims, _ in sink] == [(1, [Victim((1,))]), (3, [Victim((1,))])]


def flower_strategy(name):
    options = dict(min_train_nodes=CLIENTS, min_available_nodes=CLIENTS, fraction_evaluate=0.0)
    return {"fedavg": lambda: FedAvg(**options), "fedprox": lambda: FedProx(proximal_mu=0.5, **options),
            "fedadam": lambda: FedAdam(eta=0.01, **options), "fedyogi": lambda: FedYogi(eta=0.01, **options)}[name]()


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_the_wrapped_strategy_trains_exactly_as_it_does_alone(client_app, name):
    """Two rounds of `name` alone and wrapped (attacking every client): the same global model, to float tolerance."""
    alone, wrapped = flower_strategy(name), strategy_with(Recorder(), iterations=2, wrapped=flower_strategy(name))
    results = [strategy.start(LocalGrid(client_app, CLIENTS), ArrayRecord(lenet().state_dict()), num_rounds=2,
                              train_config=ConfigRecord(DECLARED.to_config())).arrays.to_torch_state_dict()
               for strategy in (alone, wrapped)]
    assert len(wrapped.recorder) == 2  # both rounds were attacked
    initial = lenet().state_dict()
    for key in initial:  # alone, FedAdam and FedYogi hand back float64; wrapped, the model's own float32
        assert results[1][key].dtype == initial[key].dtype
        torch.testing.assert_close(results[1][key].double(), results[0][key].double(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(results[0][key], initial[key]) for key in initial)  # and it did train


def test_fedprox_clients_train_with_the_proximal_term_the_strategy_sends(client_app, config):
    """FedProx puts proximal-mu in the config; the attack gets it in its TrainingSettings (and replays it)."""
    strategy = strategy_with(Recorder(), wrapped=flower_strategy("fedprox"))
    replies_of(strategy, client_app, lenet().state_dict(), 1)
    assert strategy._sent.settings.proximal_mu == 0.5


def assert_fedavg_of(arrays, replies):
    """`arrays` is the plain mean of the replies' weights (every client trains on as many examples)."""
    sent_back = [reply.content["arrays"].to_torch_state_dict() for reply in replies]
    average = arrays.to_torch_state_dict()
    assert set(average) == set(sent_back[0])
    for name in average:
        torch.testing.assert_close(average[name], sum(weights[name] for weights in sent_back) / len(sent_back))


def test_with_the_attack_off_it_is_plain_fedavg(client_app):
    sink = Recorder()
    strategy = strategy_with(sink, attack=None)
    replies = replies_of(strategy, client_app, lenet().state_dict(), 1)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert sink == []
    assert_fedavg_of(arrays, replies)


def test_a_failed_attack_is_reported_per_client_and_training_goes_on(client_app):
    sink = Recorder()
    strategy = strategy_with(sink, image_shape=(1, 9, 9))  # not what the model takes: the engine raises
    replies = replies_of(strategy, client_app, lenet().state_dict(), 1)
    arrays, _ = strategy.aggregate_train(1, replies)
    [(_, victims, results)] = sink
    assert victims == [Victim((0,)), Victim((1,))]
    assert all(result.status is Status.FAILED and not result.ok and result.reason for result in results)
    assert_fedavg_of(arrays, replies)  # the round's average is untouched by the failed attack


def test_clients_that_failed_are_neither_attacked_nor_averaged(client_app):
    sink = Recorder()
    strategy = strategy_with(sink)
    replies = replies_of(strategy, client_app, lenet().state_dict(), 1)
    failed = next(r for r in replies if r.content["metrics"][PARTITION_ID] == 0)
    kept = next(r for r in replies if r.content["metrics"][PARTITION_ID] == 1)
    broken = Message(Error(code=0, reason="client crashed"), reply_to=_request_of(failed))
    arrays, _ = strategy.aggregate_train(1, [broken, kept])
    assert [victims for _, victims, _ in sink] == [[Victim((1,))]]
    assert sink.faults == [(1, ReplyFault(0, CLIENT_ERROR, "error reply: client crashed"))]
    expected = kept.content["arrays"].to_torch_state_dict()
    for name, tensor in arrays.to_torch_state_dict().items():
        np.testing.assert_allclose(tensor.numpy(), expected[name].numpy())


def test_a_client_that_does_not_reply_is_recorded_and_the_round_goes_on(client_app):
    sink = Recorder()
    strategy = strategy_with(sink, attack=None)
    replies = replies_of(strategy, client_app, lenet().state_dict(), 1)
    kept = [r for r in replies if r.content["metrics"][PARTITION_ID] == 1]
    arrays, _ = strategy.aggregate_train(1, kept)
    assert [(r, fault.client, fault.status) for r, fault in sink.faults] == [(1, 0, NO_REPLY)]
    assert arrays is not None


def test_a_reply_claiming_another_clients_partition_is_left_out(client_app):
    sink = Recorder()
    strategy = strategy_with(sink)
    replies = replies_of(strategy, client_app, lenet().state_dict(), 1)
    liar = next(r for r in replies if r.content["metrics"][PARTITION_ID] == 0)
    liar.content["metrics"][PARTITION_ID] = 1
    strategy.aggregate_train(1, replies)
    [(_, fault)] = sink.faults
    assert (fault.client, fault.status) == (0, REJECTED) and "partition-id is 1, the round asked for 0" in fault.reason
    assert [victims for _, victims, _ in sink] == [[Victim((1,))]]


def test_a_resumed_run_goes_on_with_the_runs_own_round_numbers(config, client_app, shared_data):
    """Flower counts rounds from 1 in every start(); after a resume, clients, attack and evaluation must
    all see the run's round (3 here), or clients would train on round 1's examples again."""
    sink, evaluated = Recorder(), []
    strategy = RoundOffset(strategy_with(sink), done=2)
    strategy.start(LocalGrid(client_app, CLIENTS), ArrayRecord(lenet().state_dict()), num_rounds=3,
                   train_config=ConfigRecord(DECLARED.to_config()),
                   evaluate_fn=lambda server_round, arrays: evaluated.append(server_round))
    assert evaluated == [0, 3]
    [(server_round, victims, results)] = sink
    assert server_round == 3 and victims == [Victim((0,)), Victim((1,))]
    victims = [victim.clients[0] for victim in victims]
    train = load_dataset("mnist", shared_data, train=True)
    partitions = partition_indices(train.labels, CLIENTS, seed=config.seed)
    for partition_id, result in zip(victims, results):
        _, labels = train.tensors(round_examples(partitions[partition_id], 1, config.seed, partition_id, 3))
        assert torch.equal(result.labels, labels)  # iDLG reads the label of the example trained on


def test_error_reasons_are_cut_to_the_client_apps_own_message():
    simulated = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
                 "\x1b[39m (pid=1)\n  File \"clients/app.py\", line 45, in train\n    raise InjectedCrash(...)\n"
                 "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
                 "Message: client 2: injected crash'>")
    assert short_error(simulated) == "client 2: injected crash"
    assert short_error("<class 'KeyError'>:<'x'>") == "<class 'KeyError'>:<'x'>"  # a SuperNode's, unwrapped
    assert short_error("y" * 1000) == "y" * 300 + "..."


def test_the_strategy_a_run_names_is_the_one_wrapped():
    from fl_sim.server.strategy import flower_strategy as named

    assert type(named(RunConfig(strategy="fedyogi"))) is FedYogi
    assert named(RunConfig(strategy="fedprox", proximal_mu=0.3)).proximal_mu == 0.3
    assert named(RunConfig(strategy="fedadam", server_lr=0.05)).eta == 0.05


def test_attack_every_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        AttackPlan(every=0)


def _request_of(reply: Message) -> Message:
    """A stand-in for the instruction a reply answered (an error reply needs one)."""
    return Message(reply.content, dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type)
