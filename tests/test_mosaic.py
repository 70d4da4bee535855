"""The mosaic attack: each client's images read apart from the sum of many clients' updates, named by client, and
what survives SecAgg+'s quantization; the strategy sends per-client weights that share all but the rows' biases."""
import json

import numpy as np
import pytest
import torch
from flower_helpers import LocalGrid, Recorder, plain_config
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from attacker import Reconstruction
from attacker.analytic import UNRECOVERED
from clients.app import make_client_app
from clients.training import local_train
from clients.transport import expanded, is_encoding
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.transport import pack_rows, packed_smaller, unpack_rows
from fl_sim.learning.updates import Weights, parameter_names, weights
from fl_sim.results import metrics
from fl_sim.server.active import public_images
from fl_sim.server.attacks import Victim
from fl_sim.server.mosaic import (
    IMPRINT_BIAS,
    IMPRINT_WEIGHT,
    SHORTCUT,
    SPREAD,
    MosaicArmed,
    MosaicAttack,
    in_half,
    read_clients,
)
from fl_sim.server.secagg import SecAggParameters, protocol_aggregate, revealed_update
from fl_sim.server.server_app import each_client
from fl_sim.server.strategy import ClientApps, InvertingStrategy, ServerAttack

CLIP, LEVELS = 8.0, 2**22  # Flower's SecAgg+ defaults: every parameter clipped to +-8, 2^22 levels


def quantized_sum(replies: list[Weights], generator: torch.Generator) -> Weights:
    """What SecAgg+ hands the server, simulated: each reply clipped, stochastically rounded to the levels (as
    flwr.common.secure_aggregation.quantization does), the integers summed, the sum dequantized."""
    step = 2 * CLIP / LEVELS
    total: Weights = {}
    for reply in replies:
        for name, tensor in reply.items():
            scaled = (tensor.double().clamp(-CLIP, CLIP) + CLIP) / step
            low = scaled.floor()
            rounded = low + (torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < scaled - low)
            total[name] = total[name] + rounded if name in total else rounded
    return {name: value * step - CLIP * len(replies) for name, value in total.items()}


def federation(shared_data, dataset: str, model_name: str, clients: int, settings: TrainingSettings,
               rows_per_image: int = 4, protocol: SecAggParameters | None = None):
    """One round of `clients` clients training the armed model: what they were sent (the arming, for SecAgg+'s
    `protocol` when given), their replies and each one's images."""
    train, test = load_dataset(dataset, shared_data, True), load_dataset(dataset, shared_data, False)
    shape = (train.channels, train.image_size)
    rows = clients * settings.num_images * rows_per_image
    model = build_model(model_name, *shape, 10, seed=0, imprint=rows)
    attack = MosaicAttack(model, public_images(test, count=1024), blocks=4, protocol=protocol)
    armed = attack.arm(weights(model), settings, list(range(clients)))
    rng = np.random.default_rng(1)
    truth, replies = [], []
    for client in range(clients):
        sent = armed.weights[client]
        # nothing the readout reads is clipped by SecAgg+ (the spread buffer may be: the server never reads it;
        # armed for the protocol, the switched-off rows' biases may be too: the server reads against them clipped)
        assert all(float(t.abs().max()) <= CLIP for name, t in sent.items()
                   if name != SPREAD and (protocol is None or name != IMPRINT_BIAS))
        images, labels = train.tensors(rng.choice(len(train), settings.num_images, replace=False))
        local = build_model(model_name, *shape, 10, imprint=rows)
        local.load_state_dict(sent)
        local_train(local, images, labels, settings)
        truth.append(images)
        replies.append(weights(local))
    return armed, replies, truth


def read_aggregate(armed: MosaicArmed, replies: list[Weights], count: int, quantize: bool = False) -> Reconstruction:
    """The server's reading of the secure aggregate, as one victim: the mean update from the plain sum of the
    replies, or from SecAgg+'s quantized sum."""
    clients = len(replies)
    sent_sum = {name: sum(armed.weights[c][name].double() for c in range(clients)) for name in replies[0]}
    if quantize:
        total = quantized_sum(replies, torch.Generator().manual_seed(0))
    else:
        total = {name: torch.stack([reply[name].double() for reply in replies]).sum(0) for name in replies[0]}
    aggregate = {name: (total[name] - sent_sum[name]) / clients for name in total}  # the mean update
    assert armed.mosaic is not None
    return read_clients(armed.mosaic, aggregate, {client: count for client in range(clients)})


@pytest.fixture(scope="module")
def fedsgd(shared_data):
    """Four CIFAR-10 clients, one step on 8 images each, through the ConvNet."""
    return federation(shared_data, "cifar10", "cnn", 4, TrainingSettings(lr=0.1, batch_size=8))


def shares(result: Reconstruction, truth: list[torch.Tensor], db: float) -> list[float]:
    """Per client: the share of its images recovered at `db`, among the images the readout named as its own."""
    found = []
    for client, images in enumerate(truth):
        mine = [i for i, owner in enumerate(result.image_clients or []) if owner == client]
        assert len(mine) == len(images)
        score = metrics.score(result.images[mine], result.labels[mine], images, torch.zeros(len(images)).long())
        status = np.array(result.image_status)[mine][score["order"]]
        psnr = np.where(status == UNRECOVERED, 0.0, score["psnr_images"])
        found.append(float(np.mean(psnr >= db)))
    return found


def test_each_client_is_read_apart_from_the_mean_of_all_and_named(fedsgd):
    armed, replies, truth = fedsgd
    result = read_aggregate(armed, replies, 8)
    assert np.mean(shares(result, truth, 40)) >= 0.75
    # attribution: client 0's images are not another client's (its images scored against client 1's truth)
    mine = [i for i, owner in enumerate(result.image_clients or []) if owner == 0]
    wrong = metrics.score(result.images[mine], result.labels[mine], truth[1], torch.zeros(8).long())
    assert max(wrong["psnr_images"]) < 30


def test_the_readout_survives_secagg_quantization(fedsgd):
    armed, replies, truth = fedsgd
    plain = np.mean(shares(read_aggregate(armed, replies, 8), truth, 40))
    quantized = np.mean(shares(read_aggregate(armed, replies, 8, quantize=True), truth, 40))
    assert quantized >= max(0.7, plain - 0.1)


def test_fedavg_four_steps_of_four_without_quantization(shared_data):
    """Several steps: each image moves the rows, so its change must stay a small share of a bin; read from the
    plain mean (the emulated secure aggregation) it still gives most images."""
    armed, replies, truth = federation(shared_data, "mnist", "mlp", 3, TrainingSettings(lr=0.1, local_steps=4,
                                                                                       batch_size=4),
                                       rows_per_image=8)  # 2 bins an image in each of the 4 blocks
    assert np.mean(shares(read_aggregate(armed, replies, 16), truth, 30)) >= 0.8


def test_weights_on_the_grid_pass_flowers_quantization_unrounded():
    """An entry on SecAgg+'s grid (clipping range 8, 2^24 levels: Flower's float32 arithmetic is exact there) comes
    out of Flower's own stochastic quantization as exactly itself, every time; off the grid it does not; beyond
    the range it stays as sent and quantizes to the range's edge."""
    protocol = SecAggParameters(3, 2, 8.0, 2**24, 16.0)
    sent = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(0)), torch.tensor([-40.0, 9.5])])
    snapped = protocol.on_grid(sent)
    assert snapped.dtype == torch.float32 and float((snapped[:-2] - sent[:-2]).abs().max()) <= protocol.level / 2
    assert snapped[-2:].tolist() == [-40.0, 9.5]
    for tensor, exact in ((snapped, True), (sent, False)):
        # one client of weight 1 (16 examples, max weight 16): the aggregate is its reply as quantized
        once = protocol_aggregate([{"w": tensor}], [16], protocol)["w"]
        assert torch.equal(once, protocol.clipped(tensor).double()) == exact


def test_armed_for_the_protocol_several_steps_survive_its_quantization(shared_data):
    """FedAvg's 4 steps: each image may move its rows by a small share of a bin only; through SecAgg+'s
    quantization (Flower's quantize, 2^24 levels) the arming for the protocol (steeper rows, clipped at the
    range, on its grid; the shortcut and the centred, scaled input as for every multi-step arming) reads most
    images, the plain arming far fewer (docs/threat-models.md)."""
    protocol = SecAggParameters(3, 2, 8.0, 2**24, 16.0)
    settings = TrainingSettings(lr=0.05, local_steps=4, batch_size=4)
    found = {}
    for aware in (False, True):
        armed, replies, truth = federation(shared_data, "cifar10", "cnn", 4, settings, rows_per_image=6,
                                           protocol=protocol if aware else None)
        aggregate = protocol_aggregate(replies, [16] * 4, protocol)
        update, _ = revealed_update(aggregate, [armed.weights[client] for client in range(4)], [1.0] * 4,
                                    protocol if aware else None)
        assert armed.mosaic is not None
        found[aware] = np.mean(shares(read_clients(armed.mosaic, update, {c: 16 for c in range(4)}), truth, 30))
    assert found[True] >= 0.8 and found[True] >= found[False] + 0.2, found


def test_clients_share_every_tensor_but_their_rows_biases():
    model = build_model("mlp", 1, 28, 10, imprint=64)
    attack = MosaicAttack(model, torch.rand(64, 1, 28, 28), blocks=2)
    armed = attack.arm(weights(model), TrainingSettings(lr=0.1, batch_size=4), [3, 7])
    first, second = armed.weights[3], armed.weights[7]
    assert all(first[name] is second[name] for name in first if name != IMPRINT_BIAS)
    live = [(armed.weights[c][IMPRINT_BIAS] > -0.5).nonzero().flatten() for c in (3, 7)]
    assert set(live[0].tolist()).isdisjoint(live[1].tolist()) and len(live[0]) == len(live[1]) == 32
    assert armed.mosaic is not None and torch.equal(armed.mosaic.rows[7].flatten().sort().values, live[1])
    with pytest.raises(ValueError, match="raise --imprint-bins to at least 80"):
        attack.arm(weights(model), TrainingSettings(lr=0.1, batch_size=4), list(range(20)))


def test_a_split_aggregate_gives_a_row_per_client():
    images = torch.arange(4.0).reshape(4, 1, 1, 1)
    aggregate = Reconstruction(images, torch.zeros(4).long(), 0.0, image_status=["confirmed"] * 3 + [UNRECOVERED],
                               image_clients=[5, 5, 9, 9])
    victims, results, norms, apart = each_client([Victim((5, 9), secure_aggregate=True)], [aggregate], [2.0])
    assert victims == [Victim((5,)), Victim((9,))] and norms == [2.0, 2.0] and apart == [True, True]
    assert results[1].images.flatten().tolist() == [2.0, 3.0] and results[1].image_status == ["confirmed", UNRECOVERED]


def test_the_strategy_sends_each_client_its_rows_and_reads_the_secure_aggregate(shared_data, tmp_path,
                                                                                 server_identity):
    clients, rows = 3, 3 * 4 * 4
    config = plain_config(out=str(tmp_path), num_clients=clients, data_root=str(shared_data), train_mode="steps",
                          batch_size=4, model="mlp", attack="mosaic", imprint_bins=rows, imprint_blocks=2)
    model = build_model("mlp", 1, 28, 10, imprint=rows, seed=0)
    test = load_dataset("mnist", shared_data, False)
    attack = MosaicAttack(build_model("mlp", 1, 28, 10, imprint=rows), public_images(test, count=512), blocks=2)
    sink = Recorder()
    strategy = InvertingStrategy(FedAvg(min_train_nodes=clients, min_available_nodes=clients, fraction_evaluate=0.0),
                                 ServerAttack(attack, tuple(parameter_names(model))), sink,
                                 partitions={100 + p: p for p in range(clients)}, secure_aggregation=True)
    grid = LocalGrid(make_client_app(config), clients)
    global_weights = weights(model)
    settings = TrainingSettings(lr=0.1, batch_size=4)
    messages = list(strategy.configure_train(1, ArrayRecord(global_weights), ConfigRecord(settings.to_config()), grid))
    sent = [message.content["arrays"] for message in messages]
    assert sent[0]["base.layers.1.weight"].data is sent[1]["base.layers.1.weight"].data  # serialised once
    assert sent[0][IMPRINT_BIAS].data != sent[1][IMPRINT_BIAS].data
    assert sent[0][IMPRINT_BIAS].dtype == "float32"
    packed = sent[0][IMPRINT_WEIGHT]  # the rows' weights: float16 (Armed.narrow), as their distinct rows
    assert packed is sent[1][IMPRINT_WEIGHT] and is_encoding(packed) and len(packed.data) < rows * 784 * 2 // 4
    full = expanded(sent[0])[IMPRINT_WEIGHT].numpy()  # what the ClientApp's outermost mod hands the rest
    assert full.dtype == np.float16 and np.array_equal(full, strategy.sent_round.sent_to[0][IMPRINT_WEIGHT].numpy()
                                                       .astype(np.float16))
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    [(_, [victim], [result])] = sink
    assert victim == Victim((0, 1, 2), secure_aggregate=True)
    assert result.ok and result.image_clients == [0] * 4 + [1] * 4 + [2] * 4
    assert sum(state != UNRECOVERED for state in result.image_status or []) >= 6
    average = arrays.to_torch_state_dict()  # the imprint block stays the global (disarmed) one
    torch.testing.assert_close(average[IMPRINT_BIAS], global_weights[IMPRINT_BIAS])  # FedAvg rounds a little
    assert not torch.equal(average["base.layers.1.weight"], global_weights["base.layers.1.weight"])


def test_a_users_client_app_is_sent_the_block_whole(shared_data, server_identity):
    """Only fl-sim's own ClientApp expands the distinct rows: a strategy around a user's ClientApp sends the full
    block (float16, its own shape), which any ClientApp loads."""
    clients, rows = 2, 2 * 4 * 4
    config = plain_config(num_clients=clients, data_root=str(shared_data), train_mode="steps", batch_size=4,
                          model="mlp", attack="mosaic", imprint_bins=rows, imprint_blocks=2)
    model = build_model("mlp", 1, 28, 10, imprint=rows, seed=0)
    attack = MosaicAttack(build_model("mlp", 1, 28, 10, imprint=rows), torch.rand(64, 1, 28, 28), blocks=2)
    sent = {}
    for expands in (True, False):
        strategy = InvertingStrategy(FedAvg(min_train_nodes=clients, min_available_nodes=clients),
                                     ServerAttack(attack, tuple(parameter_names(model))), Recorder(),
                                     partitions={100 + p: p for p in range(clients)}, secure_aggregation=True,
                                     apps=ClientApps(expands_rows=expands))
        [message, _] = strategy.configure_train(1, ArrayRecord(weights(model)),
                                                ConfigRecord(TrainingSettings(lr=0.1, batch_size=4).to_config()),
                                                LocalGrid(make_client_app(config), clients))
        sent[expands] = message.content["arrays"][IMPRINT_WEIGHT]
    assert is_encoding(sent[True]) and not is_encoding(sent[False])
    assert sent[False].dtype == "float16" and tuple(sent[False].shape) == (rows, 784)
    assert np.array_equal(expanded(ArrayRecord({"w": sent[True]}))["w"].numpy(), sent[False].numpy())


def test_over_several_steps_the_shortcut_leaves_the_logits_to_the_base_model_and_the_rows_still_learn():
    """Armed for several steps, the rows reach the logits through the shortcut, whose value is nothing: the logits
    are the base model's own (no input shift either), yet each live row gets its images' gradient."""
    model = build_model("mlp", 1, 28, 10, imprint=2 * 2 * 8, seed=0)
    attack = MosaicAttack(model, torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)), blocks=2)
    armed = attack.arm(weights(model), TrainingSettings(lr=0.1, local_steps=2, batch_size=4), [3, 7])
    model.load_state_dict(armed.weights[3])
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert float(armed.weights[3][SHORTCUT].abs().max()) > 0  # armed: the shortcut carries the rows' gradient
    assert torch.equal(model(images), model.base(images))
    torch.nn.functional.cross_entropy(model(images), torch.arange(4)).backward()
    assert armed.mosaic is not None
    rows = armed.mosaic.rows[3].flatten()
    grad = model.imprint.bias.grad
    assert grad is not None and float(grad[rows].abs().max()) > 0
    others = torch.ones(len(grad), dtype=torch.bool)
    others[rows] = False
    assert float(grad[others].abs().max()) == 0  # the other client's rows are switched off for this one


def test_without_imprint_bins_a_ten_client_run_builds_the_rows_its_round_needs_and_reads_every_client(shared_data,
                                                                                                     tmp_path):
    """`fl-sim run --attack mosaic` with no --imprint-bins: the clients and the server build the block sized for the
    round (10 clients x 4 images x 4 rows an image), and the secure aggregate is read client by client."""
    from fl_sim.commands import cli

    out = tmp_path / "run"
    assert cli.main(["run", "--dataset", "mnist", "--data-root", str(shared_data), "--model", "mlp", "--num-clients",
                     "10", "--rounds", "1", "--train-mode", "steps", "--batch-size", "4", "--attack", "mosaic",
                     "--defense", "secagg-emulated", "--seed", "0", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["imprint-bins"] == 0 and record["imprint_rows"] == 10 * 4 * 4, record
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(row["client"] for row in rows) == list(range(10))
    psnr = np.concatenate([row["psnr_images"] for row in rows])
    assert len(psnr) == 40 and float(np.mean(psnr >= 30)) >= 0.7, psnr


@pytest.mark.parametrize(("training", "per_image"), [
    (dict(train_mode="fedsgd", batch_size=8), 4),
    (dict(train_mode="steps", local_steps=4, batch_size=4), 6),
    (dict(train_mode="epochs", batch_size=8, min_shard=10, max_shard=14), 6),
    (dict(train_mode="epochs", batch_size=16, min_shard=10, max_shard=14), 4)])
def test_the_rows_built_without_imprint_bins_are_what_the_sampled_clients_shards_need(shared_data, training,
                                                                                     per_image):
    """The block is sized from the clients Flower samples (int(clients x fraction)), the most images any client
    trains on in a round (against the shards themselves) and the rows an image of the training mode; each client's
    slice holds that many rows for each of its images."""
    from fl_sim.contract.run_config import RunConfig
    from fl_sim.learning.partition import client_shards, training_examples

    config = RunConfig(attack="mosaic", dataset="mnist", data_root=str(shared_data), num_clients=30,
                       fraction_train=0.34, **training)
    config.check()
    shards = client_shards(load_dataset("mnist", shared_data, True).labels, config.num_clients, config.partition,
                           config.alpha, config.seed, config.min_shard, config.max_shard)
    most = max(len(training_examples(shard, config.training, config.seed, client, 1))
               for client, shard in enumerate(shards))
    sampled = 10  # int(30 x 0.34), as FedAvg samples
    assert config.imprint_rows >= per_image * sampled * most
    assert config.imprint_rows < per_image * sampled * most + sampled * config.imprint_blocks  # bins rounded up
    model = build_model("mlp", 1, 28, 10, imprint=config.imprint_rows)
    attack = MosaicAttack(model, public_images(load_dataset("mnist", shared_data, False), count=256),
                          blocks=config.imprint_blocks, client_images=config.client_images)
    armed = attack.arm(weights(model), config.training, list(range(sampled)))
    assert armed.mosaic is not None
    for client in range(sampled):  # a client's rows
        assert armed.mosaic.rows[client].numel() >= per_image * most


def test_an_explicit_imprint_bins_wins_and_is_still_refused_when_too_small():
    from fl_sim.contract.run_config import ConfigError, RunConfig

    sized = RunConfig(attack="mosaic", num_clients=40, train_mode="steps", batch_size=8)
    assert sized.imprint_rows == 40 * 8 * 4
    assert RunConfig(attack="mosaic", num_clients=40, train_mode="steps", batch_size=8,
                     imprint_bins=2 * 4 * 40).imprint_rows == 320
    with pytest.raises(ConfigError, match=r"^--attack mosaic: 256 imprint rows cannot give 40 clients a round 4 "
                                          r"blocks of 2 or more bins each: pass --imprint-bins 320 or more"):
        RunConfig(attack="mosaic", num_clients=40, train_mode="steps", batch_size=8, imprint_bins=256).check()
    with pytest.raises(ConfigError, match="pass --imprint-bins, or --max-shard"):  # epochs over whole partitions
        RunConfig(attack="mosaic", num_clients=40, max_shard=0).check()


@pytest.mark.parametrize("protocol", [None, SecAggParameters(3, 2, 8.0, 2**24, 16.0)])
def test_the_rows_weights_travel_as_float16_holding_exactly_what_the_server_reads_against(protocol):
    """The rows' weights, nearly all of the block, are sent as float16: the server rounds them to values float16
    holds (and to SecAgg+'s grid when armed for it), so what a client loads is what the server reads against."""
    model = build_model("mlp", 1, 28, 10, imprint=2 * 2 * 8, seed=0)
    attack = MosaicAttack(model, torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)), blocks=2,
                          protocol=protocol)
    for settings in (TrainingSettings(lr=0.1, batch_size=4), TrainingSettings(lr=0.1, local_steps=2, batch_size=4)):
        armed = attack.arm(weights(model), settings, [3, 7])
        assert dict(armed.narrow) == {IMPRINT_WEIGHT: torch.float16}
        held = armed.weights[3][IMPRINT_WEIGHT]
        assert held.dtype == torch.float32 and float(held.abs().max()) > 0
        assert torch.equal(held.half().float(), held)
        if protocol is not None:
            assert torch.equal(protocol.on_grid(held), held)
    odd = SecAggParameters(3, 2, 3.0, 1000, 16.0)  # a grid float16 cannot hold: sent in float32
    assert in_half(torch.linspace(-1, 1, 101), odd) is None


def test_under_flwr_run_the_clients_build_the_block_the_server_sizes_from_the_run_config(shared_data):
    """`flwr run` hands both apps Flower's run config (imprint-bins 0 from pyproject.toml): the ServerApp's model
    and the ClientApp's received model are the same sized block, so the armed weights load."""
    from clients.app import received_model
    from fl_sim.contract.run_config import RunConfig

    config = RunConfig.from_flower({"attack": "mosaic", "dataset": "mnist", "data-root": str(shared_data),
                                    "model": "mlp", "num-clients": 5, "fraction-train": 0.6, "train-mode": "steps",
                                    "local-steps": 2, "batch-size": 4, "imprint-bins": 0})
    assert config.imprint_rows == 3 * 8 * 6  # int(5 x 0.6) clients x 8 images x 6 rows an image (several steps)
    server = build_model("mlp", 1, 28, 10, imprint=config.imprint_rows)
    attack = MosaicAttack(server, torch.rand(64, 1, 28, 28), blocks=config.imprint_blocks)
    armed = attack.arm(weights(server), config.training, [0, 1, 2])
    client = received_model(armed.weights[1], config, load_dataset("mnist", shared_data, False))
    assert client.state_dict()[IMPRINT_WEIGHT].shape == (3 * 8 * 6, 28 * 28)


@pytest.mark.parametrize("steps", [1, 4])
def test_the_block_sent_as_its_distinct_rows_expands_to_exactly_the_armed_block(steps):
    """The rows' weights travel as their distinct rows and each row's index: a few rows (one per block, and the
    unused rows' zeros) for thousands, and what the client expands is the armed block bit for bit."""
    rows = 4 * 16 * 6
    model = build_model("mlp", 3, 32, 10, imprint=rows, seed=0)
    attack = MosaicAttack(model, torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0)), blocks=4,
                          protocol=SecAggParameters(3, 2, 8.0, 2**22, 16.0))
    armed = attack.arm(weights(model), TrainingSettings(lr=0.1, local_steps=steps, batch_size=16 // steps), [0, 1, 2])
    assert armed.distinct_rows == {IMPRINT_WEIGHT}
    sent = armed.weights[2][IMPRINT_WEIGHT].half().numpy()
    packed = packed_smaller(sent)
    assert packed is not None and packed.nbytes < sent.nbytes / 50, packed.nbytes if packed is not None else None
    back = unpack_rows(packed)
    assert back.dtype == sent.dtype and back.shape == sent.shape
    assert back.tobytes() == sent.tobytes()  # bit for bit
    assert torch.equal(torch.from_numpy(back).float(), armed.weights[2][IMPRINT_WEIGHT])


def test_the_distinct_rows_encoding_is_bitwise_and_refuses_an_encoding_that_is_not_whole():
    matrix = np.array([[0.0, 1.5], [-0.0, 1.5], [np.nan, 2.0], [0.0, 1.5]], dtype=np.float32)
    back = unpack_rows(pack_rows(matrix))
    assert back.tobytes() == matrix.tobytes()  # -0.0 is its own row, NaN comes back
    assert packed_smaller(np.eye(3, dtype=np.float32)) is None  # all rows distinct: sent plain
    with pytest.raises(ValueError, match="bytes, not"):
        unpack_rows(pack_rows(matrix)[:-1])
    with pytest.raises(ValueError, match="2-D numeric"):
        pack_rows(np.zeros(3))
