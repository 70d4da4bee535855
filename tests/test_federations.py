"""Federations trained the way Flower users train them: each mode's global model is exactly what a plain PyTorch
FedAvg loop computes, shards of unequal size are weighted by their size, BatchNorm models train round after
round with every reply accepted, and the server accepts any shard size the mode allows, and nothing else."""
import dataclasses

import pytest
import torch
from flower_helpers import LocalGrid, Recorder, inverting_fedavg
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from clients.app import make_client_app, order_seed
from clients.training import local_train
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import client_shards, training_examples
from fl_sim.server.validation import ExpectedReply, reply_problem

pytestmark = pytest.mark.usefixtures("server_identity")
CLIENTS, ROUNDS = 3, 2


def config_for(shared_data, tmp_path, **settings) -> RunConfig:
    return RunConfig(out=str(tmp_path), num_clients=CLIENTS, data_root=str(shared_data), model="mlp", seed=7,
                     min_shard=5, max_shard=23, attack="none", **settings)


def plain_fedavg(config: RunConfig, shared_data) -> dict[str, torch.Tensor]:
    """The same federation as a plain PyTorch loop: every client trains a copy, the mean weighs by examples."""
    train = load_dataset("mnist", shared_data, train=True)
    shards = client_shards(train.labels, CLIENTS, config.partition, config.alpha, config.seed, config.min_shard,
                           config.max_shard)
    global_model = build_model("mlp", 1, 28, 10)
    for server_round in range(1, ROUNDS + 1):
        states, counts = [], []
        for client in range(CLIENTS):
            examples = training_examples(shards[client], config.training, config.seed, client, server_round)
            images, labels = train.tensors(examples)
            model = build_model("mlp", 1, 28, 10)
            model.load_state_dict(global_model.state_dict())
            local_train(model, images, labels, config.training, order_seed(config.seed, client, server_round))
            states.append(model.state_dict())
            counts.append(len(examples))
        global_model.load_state_dict({name: sum(state[name] * count for state, count in zip(states, counts))
                                      / sum(counts) for name in states[0]})
    return global_model.state_dict()


@pytest.mark.parametrize("mode,settings", [
    ("fedsgd", dict(batch_size=4)),
    ("steps", dict(local_steps=3, batch_size=2)),
    ("epochs", dict(epochs=2, batch_size=4, momentum=0.5, weight_decay=0.01)),
])
def test_each_mode_trains_the_global_model_a_plain_fedavg_loop_trains(mode, settings, shared_data, tmp_path):
    config = config_for(shared_data, tmp_path, train_mode=mode, lr=0.1, **settings)
    strategy = inverting_fedavg(Recorder(), CLIENTS, attack=None,
                                wrapped=FedAvg(min_train_nodes=CLIENTS, min_available_nodes=CLIENTS,
                                               fraction_evaluate=0.0))
    result = strategy.start(LocalGrid(make_client_app(config), CLIENTS),
                            ArrayRecord(build_model("mlp", 1, 28, 10).state_dict()), num_rounds=ROUNDS,
                            train_config=ConfigRecord(config.training.to_config()))
    assert strategy.recorder.faults == []
    expected, got = plain_fedavg(config, shared_data), result.arrays.to_torch_state_dict()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_shards_are_unequal_within_bounds_and_epochs_replies_say_their_size(shared_data, tmp_path):
    config = config_for(shared_data, tmp_path, train_mode="epochs", batch_size=4)
    train = load_dataset("mnist", shared_data, train=True)
    shards = client_shards(train.labels, CLIENTS, "iid", 0.5, config.seed, 5, 23)
    sizes = [len(shard) for shard in shards]
    assert all(5 <= size <= 23 for size in sizes) and len(set(sizes)) > 1
    grid, strategy = LocalGrid(make_client_app(config), CLIENTS), inverting_fedavg(Recorder(), CLIENTS, attack=None)
    messages = strategy.configure_train(1, ArrayRecord(build_model("mlp", 1, 28, 10).state_dict()),
                                        ConfigRecord(config.training.to_config()), grid)
    replies = grid.send_and_receive(messages)
    assert sorted(reply.content["metrics"]["num-examples"] for reply in replies) == sorted(sizes)


def test_a_batchnorm_model_trains_round_after_round_with_every_reply_accepted(shared_data, tmp_path):
    """FedAvg averages num_batches_tracked into float64; the wrapper keeps the model's int64, so round 2's
    replies (int64, as the clients' models hold it) are accepted and the model keeps training."""
    config = dataclasses.replace(config_for(shared_data, tmp_path, train_mode="epochs", batch_size=4),
                                 model="resnet20", min_shard=4, max_shard=8)
    sink, seen = Recorder(), []
    strategy = inverting_fedavg(sink, CLIENTS, attack=None)
    initial = build_model("resnet20", 1, 28, 10).state_dict()
    strategy.start(LocalGrid(make_client_app(config), CLIENTS), ArrayRecord(initial), num_rounds=3,
                   train_config=ConfigRecord(config.training.to_config()),
                   evaluate_fn=lambda server_round, arrays: seen.append(arrays.to_torch_state_dict()))
    assert sink.faults == []
    assert len(seen) == 4  # the initial model and rounds 1-3
    for before, after in zip(seen, seen[1:]):
        assert any(not torch.equal(before[name], after[name]) for name in before if "conv" in name)
        assert after["bn1.num_batches_tracked"].dtype == torch.int64
        assert after["bn1.running_var"].dtype == torch.float32


@pytest.mark.parametrize("count,problem", [
    (17, None), (1, None), (40, None),
    (0, "num-examples is 0, the round allows an integer from 1 to 40"),
    (-3, "num-examples is -3, the round allows an integer from 1 to 40"),
    (41, "num-examples is 41, the round allows an integer from 1 to 40"),
    (12.5, "num-examples is 12.5, the round allows an integer from 1 to 40"),
])
def test_an_epochs_reply_may_say_any_shard_size_the_server_allows_and_nothing_else(count, problem):
    weights = ArrayRecord({"w": torch.zeros(2)})
    expected = ExpectedReply.like(weights, {"num-examples": range(1, 41)})
    from flwr.app import MetricRecord, RecordDict

    reply = RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": count})})
    assert reply_problem(reply, expected) == problem


def test_the_attack_knows_an_epochs_clients_steps_from_its_shard_size():
    settings = TrainingSettings(lr=0.1, batch_size=4, epochs=2, mode="epochs").for_shard(10)
    assert (settings.num_images, settings.steps_per_epoch, settings.total_steps) == (10, 3, 6)
    assert settings.batch_slices() == [slice(0, 4), slice(4, 8), slice(8, 10)]
    with pytest.raises(ValueError, match="fedsgd"):
        TrainingSettings(lr=0.1, local_steps=2, mode="fedsgd")
