"""The ClientApp, called directly with hand-built Flower messages (no Ray): it trains as configured, on its data."""
import pytest
import torch
from flower_helpers import lenet, node_context, plain_config, train_message
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from attacker import TrainingSettings
from clients.app import make_client_app
from clients.training import local_train
from fl_sim.contract.protocol import PARTITION_ID
from fl_sim.learning.data import load_dataset
from fl_sim.learning.partition import partition_indices, round_examples

TRAINING = TrainingSettings(lr=0.05, local_steps=2, batch_size=3)
pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.fixture(scope="module")
def config(shared_data, tmp_path_factory):
    return plain_config(out=str(tmp_path_factory.mktemp("out")), num_clients=3, data_root=str(shared_data), seed=5,
                     train_mode="steps", batch_size=1, model="lenet")


def test_the_client_trains_on_its_round_examples_with_the_sent_settings(config, shared_data):
    weights = lenet().state_dict()
    reply = make_client_app(config)(train_message(weights, TRAINING, server_round=2), node_context(1, 3))

    train = load_dataset("mnist", shared_data, train=True)
    partition = partition_indices(train.labels, 3, "iid", seed=config.seed)[1]
    images, labels = train.tensors(round_examples(partition, TRAINING.num_images, config.seed, 1, 2))
    expected = lenet()
    local_train(expected, images, labels, TRAINING)

    got = reply.content["arrays"].to_torch_state_dict()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(got[name], tensor)
    assert any(not torch.equal(got[name], weights[name]) for name in weights)


def test_the_reply_holds_what_a_flower_client_sends_plus_the_partition(config):
    message = train_message(lenet().state_dict(), TRAINING, server_round=1)
    reply = make_client_app(config)(message, node_context(2, 3))
    assert reply.metadata.dst_node_id == message.metadata.src_node_id
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {"train-loss", "num-examples", PARTITION_ID}
    assert metrics["num-examples"] == TRAINING.num_images
    assert metrics[PARTITION_ID] == 2
    assert metrics["train-loss"] > 0


def test_clients_and_rounds_see_different_data(config):
    app, weights = make_client_app(config), lenet().state_dict()

    def new_weights(partition_id, server_round):
        reply = app(train_message(weights, TRAINING, server_round), node_context(partition_id, 3))
        return reply.content["arrays"].to_torch_state_dict()["classifier.weight"]

    first = new_weights(0, 1)
    assert torch.equal(first, new_weights(0, 1))
    assert not torch.equal(first, new_weights(1, 1))
    assert not torch.equal(first, new_weights(0, 2))


def test_flower_run_config_overrides_the_apps_defaults(config):
    """Under `flwr run` the run config decides: another seed gives other data."""
    weights = lenet().state_dict()
    app = make_client_app(config)
    default = app(train_message(weights, TRAINING, 1), node_context(0, 3)).content["arrays"]
    reseeded = app(train_message(weights, TRAINING, 1), node_context(0, 3, {"seed": 6})).content["arrays"]
    assert not torch.equal(default.to_torch_state_dict()["classifier.bias"],
                           reseeded.to_torch_state_dict()["classifier.bias"])


def test_federated_evaluation_scores_the_sent_model_on_the_clients_test_share(config, shared_data):
    message = Message(RecordDict({"arrays": ArrayRecord(lenet().state_dict()), "config": ConfigRecord()}),
                      dst_node_id=101, message_type=MessageType.EVALUATE)
    metrics = make_client_app(config)(message, node_context(0, 3)).content["metrics"]
    test_size = len(load_dataset("mnist", shared_data, train=False))
    assert metrics["num-examples"] in (test_size // 3, test_size // 3 + 1)
    assert 0 <= metrics["accuracy"] <= 1
    assert metrics["loss"] > 0


def test_without_a_partition_in_the_node_config_the_error_says_how_to_give_one(config):
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="node config lacks 'partition-id'.*--node-config"):
        make_client_app(config)(train_message(lenet().state_dict(), TRAINING, 1), context)


def test_a_round_without_training_settings_is_refused(config):
    message = Message(RecordDict({"arrays": ArrayRecord(lenet().state_dict()),
                                  "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=101, message_type=MessageType.TRAIN)
    with pytest.raises(ValueError, match="lacks local-steps"):
        make_client_app(config)(message, node_context(0, 3))
