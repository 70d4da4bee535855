"""The inverting strategy, driven round by round with real ClientApp replies (no Ray): it attacks as planned,
hands the engine the true updates, and still aggregates exactly as FedAvg."""
import numpy as np
import pytest
import torch
from flower_helpers import lenet, node_context, server_identity  # noqa: F401 (fixture)
from flwr.app import ArrayRecord, ConfigRecord, Error, Message

from attacker import TrainingSettings, get_attack
from clients.app import PARTITION_KEY, make_client_app
from fl_sim.data import load_dataset
from fl_sim.federation import RunConfig, settings_to_config
from fl_sim.metrics import psnr
from fl_sim.partition import partition_indices, round_examples
from fl_sim.strategy import AttackPlan, InvertingFedAvg

SETTINGS = TrainingSettings(lr=0.1, local_steps=1, batch_size=1)
CLIENTS = 2
pytestmark = pytest.mark.usefixtures("server_identity")


class NodeIds:
    """The one Grid call FedAvg's node sampling makes."""

    def get_node_ids(self):
        return [100 + partition_id for partition_id in range(CLIENTS)]


class Sink(list):
    """Collects what the strategy hands to the evaluation path."""

    def __call__(self, server_round, victims, results, seconds):
        self.append((server_round, victims, results))


@pytest.fixture(scope="module")
def config(shared_data, tmp_path_factory):
    return RunConfig(out=str(tmp_path_factory.mktemp("out")), num_clients=CLIENTS, data_root=str(shared_data))


@pytest.fixture(scope="module")
def client_app(config):
    return make_client_app(config)


def strategy_with(sink, attack="idlg", iterations=1, **options):
    options.setdefault("image_shape", (1, 28, 28))
    return InvertingFedAvg(lenet(), get_attack(attack, restarts=1) if attack else None, sink, num_classes=10,
                           iterations=iterations, device="cpu", min_train_nodes=CLIENTS,
                           min_available_nodes=CLIENTS, fraction_evaluate=0.0, **options)


def replies_of(strategy, client_app, weights, server_round):
    messages = strategy.configure_train(server_round, ArrayRecord(weights), ConfigRecord(settings_to_config(SETTINGS)),
                                        NodeIds())
    return [client_app(msg, node_context(msg.metadata.dst_node_id - 100, CLIENTS)) for msg in messages]


def test_a_round_inverts_every_client_then_aggregates_as_fedavg(config, client_app, shared_data):
    sink = Sink()
    strategy = strategy_with(sink, iterations=5)
    weights = lenet().state_dict()
    replies = replies_of(strategy, client_app, weights, server_round=1)
    sent_back = {int(r.content["metrics"][PARTITION_KEY]): r.content["arrays"].to_torch_state_dict() for r in replies}

    arrays, metrics = strategy.aggregate_train(1, replies)

    [(server_round, victims, results)] = sink
    assert server_round == 1 and victims == [0, 1]
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


def test_the_plan_picks_rounds_and_clients(client_app):
    sink = Sink()
    strategy = strategy_with(sink, plan=AttackPlan(every=2, clients=frozenset({1})))
    weights = lenet().state_dict()
    for server_round in (1, 2, 3):
        arrays, _ = strategy.aggregate_train(server_round, replies_of(strategy, client_app, weights, server_round))
        weights = arrays.to_torch_state_dict()
    assert [(server_round, victims) for server_round, victims, _ in sink] == [(1, [1]), (3, [1])]


def test_with_the_attack_off_it_is_plain_fedavg(client_app):
    sink = Sink()
    strategy = strategy_with(sink, attack=None)
    arrays, _ = strategy.aggregate_train(1, replies_of(strategy, client_app, lenet().state_dict(), 1))
    assert sink == [] and arrays is not None


def test_a_failed_attack_is_reported_per_client_and_training_goes_on(client_app):
    sink = Sink()
    strategy = strategy_with(sink, image_shape=(1, 9, 9))  # not what the model takes: the engine raises
    arrays, _ = strategy.aggregate_train(1, replies_of(strategy, client_app, lenet().state_dict(), 1))
    [(_, victims, results)] = sink
    assert victims == [0, 1]
    assert all(result.status.startswith("error: ") and not result.ok for result in results)
    assert arrays is not None


def test_clients_that_failed_are_neither_attacked_nor_averaged(client_app):
    sink = Sink()
    strategy = strategy_with(sink)
    replies = replies_of(strategy, client_app, lenet().state_dict(), 1)
    failed = next(r for r in replies if r.content["metrics"][PARTITION_KEY] == 0)
    kept = next(r for r in replies if r.content["metrics"][PARTITION_KEY] == 1)
    broken = Message(Error(code=0, reason="client crashed"), reply_to=_request_of(failed))
    arrays, _ = strategy.aggregate_train(1, [broken, kept])
    assert [victims for _, victims, _ in sink] == [[1]]
    expected = kept.content["arrays"].to_torch_state_dict()
    for name, tensor in arrays.to_torch_state_dict().items():
        np.testing.assert_allclose(tensor.numpy(), expected[name].numpy())


def test_a_reply_without_its_partition_is_refused(client_app):
    strategy = strategy_with(Sink())
    replies = replies_of(strategy, client_app, lenet().state_dict(), 1)
    del replies[0].content["metrics"][PARTITION_KEY]
    with pytest.raises(ValueError, match="has no 'partition-id'"):
        strategy.aggregate_train(1, replies)


def test_attack_every_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        AttackPlan(every=0)


def _request_of(reply: Message) -> Message:
    """A stand-in for the instruction a reply answered (an error reply needs one)."""
    return Message(reply.content, dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type)
