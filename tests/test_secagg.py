"""Flower's real SecAgg+ behind `--defense secagg` (fl_sim/server/secagg.py, clients/secagg.py), its emulation
(`--defense secagg-emulated`), and `fl-sim run --ray-address` attaching a simulation to a running Ray cluster."""
import argparse
import functools
import json
from typing import cast

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from clients.app import make_client_app
from clients.mods import DefenseMod, DetectMod, FaultMod, FlowerDpMods, InspectMod
from clients.secagg import SecAggPlusMod, legacy_fit, state_names
from clients.transport import ExpandRowsMod
from fl_sim.commands import cli
from fl_sim.commands import run as run_command
from fl_sim.contract.defenses import SECAGG_MODULUS, DefenseSpec
from fl_sim.contract.records import FLAGGED
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.models import build_model
from fl_sim.learning.transport import pack_rows
from fl_sim.results.outputs import read_jsonl
from fl_sim.server.flower_private import SECAGG_CONFIGS, SecAggKey
from fl_sim.server.resume import load_checkpoint
from fl_sim.server.secagg import SecAggParameters, SummingGrid, fold, protocol_aggregate, protocol_mean, revealed_update

# The malicious server's choice of SecAgg+ settings for 4 clients of 8 images: every weight 1 (max weight = the
# round's count), the most levels 4 clients allow (4 x levels < 2^32) over +-1. Under Flower's defaults (+-8, 2^22
# levels, weight 8/1000) a client's entry is off by up to 3.8e-6 / (8/1000) = 4.8e-4, more than the imprint's
# weight changes (~5e-5): the imprint then recovers nothing (docs/threat-models.md). Flower's client quantizes in
# float32, so levels beyond ~2^24 help less than their count says.
LEVELS = 2**30 - 1
FINE = ["--secagg-max-weight", "8", "--secagg-quantization-range", str(LEVELS), "--secagg-clipping-range", "1"]


def random_weights(seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 7, generator=generator) * scale, "b": torch.randn(7, generator=generator) * scale}


def test_the_protocols_aggregate_is_the_example_weighted_mean_to_one_level_per_client():
    """Flower's own quantize/dequantize: clients weigh in with num-examples / max-weight, each entry of the sum is
    off by less than one level per client; not exactly the mean (stochastic rounding), and clipping bites."""
    replies, counts = [random_weights(seed) for seed in range(5)], [3, 8, 8, 5, 1]
    protocol = SecAggParameters(3, 2)
    aggregate = protocol_aggregate(replies, counts, protocol)
    mean = {name: sum(count * reply[name].double() for reply, count in zip(replies, counts)) / sum(counts)
            for name in replies[0]}
    bound = protocol.resolution(counts)
    assert 0 < bound < 1e-2
    for name in mean:
        error = (aggregate[name] - mean[name]).abs().max().item()
        assert 0 < error <= bound, name
    unweighted = {name: torch.stack([reply[name].double() for reply in replies]).mean(0) for name in replies[0]}
    assert max((aggregate[name] - unweighted[name]).abs().max().item() for name in mean) > 10 * bound
    # a range the weighted parameters leave: clipped, far from the mean
    clipped = protocol_aggregate(replies, counts, SecAggParameters(3, 2, clipping_range=1e-4))
    assert (clipped["w"] - mean["w"]).abs().max().item() > 100 * bound


def test_the_revealed_update_is_the_aggregate_against_the_same_weighted_mean_of_what_was_sent():
    sent = [random_weights(10 + seed) for seed in range(3)]
    replies = [{name: tensor + 0.01 * (index + 1) for name, tensor in weights.items()}
               for index, weights in enumerate(sent)]
    protocol = SecAggParameters(3, 2, max_weight=16, quantization_range=2**28, clipping_range=1)
    counts = [16, 16, 8]
    aggregate = protocol_aggregate(replies, counts, protocol)
    update, mean_sent = revealed_update(aggregate, sent, [protocol.weight(count) for count in counts])
    expected = (16 * 0.01 + 16 * 0.02 + 8 * 0.03) / 40  # the weighted mean change of every entry
    assert torch.allclose(update["w"].double(), torch.full((5, 7), expected, dtype=torch.float64),
                          atol=protocol.resolution(counts))
    assert update["w"].dtype == torch.float32
    assert torch.allclose(mean_sent["b"], (16 * sent[0]["b"] + 16 * sent[1]["b"] + 8 * sent[2]["b"]) / 40)


def test_the_weighted_mean_of_what_was_sent_counts_a_tensor_shared_by_several_clients_once_per_client():
    # an attack sends every client the same block object and its own bias; the mean must weigh the shared block by
    # all of its clients' factors, as it weighs separate copies of it
    block = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    biases = [torch.full((6,), float(index)) for index in range(4)]
    factors = [1.0, 2.0, 0.5, 4.0]
    shared = [{"w": block, "b": bias} for bias in biases]
    copies = [{"w": block.clone(), "b": bias} for bias in biases]
    together, apart = protocol_mean(shared, factors), protocol_mean(copies, factors)
    assert torch.allclose(together["w"], block.double(), atol=1e-12)  # one tensor, whatever its weights
    assert torch.allclose(together["w"], apart["w"], atol=1e-12)
    assert torch.allclose(together["b"], torch.full((6,), (0 * 1 + 1 * 2 + 2 * 0.5 + 3 * 4) / 7.5, dtype=torch.float64))
    half = protocol_mean([{"w": block}, {"w": torch.zeros(6, 5)}, {"w": block}], [1.0, 2.0, 1.0])
    assert torch.allclose(half["w"], block.double() / 2)  # the shared block's two factors, against the zeros' 2


def test_secagg_and_its_emulation_are_named_apart_and_the_protocols_settings_are_checked():
    assert DefenseSpec.parse("secagg").protocol and not DefenseSpec.parse("secagg").emulated
    emulated = DefenseSpec.parse("prune:0.5+secagg-emulated")
    assert (emulated.secure_aggregation, emulated.emulated, emulated.protocol) == (True, True, False)
    assert str(emulated) == "prune:0.5+secagg-emulated"
    with pytest.raises(ConfigError, match="comes once"):
        DefenseSpec.parse("secagg+secagg-emulated")
    RunConfig(defense="secagg", num_clients=4).check()
    for values, message in (({"num_clients": 1}, "at least 2 clients"),
                            ({"secagg_threshold": 3.0}, "must be below --secagg-shares"),
                            ({"secagg_shares": 2.0}, "count above 2"),
                            ({"secagg_shares": 3.5}, "count above 2"),
                            ({"num_clients": 1100}, "overflows SecAgg\\+'s modulus"),
                            ({"secagg_quantization_range": 2**31}, "use at most 2147483647 levels")):
        with pytest.raises(ConfigError, match=message):
            RunConfig(defense="secagg", **{"num_clients": 2, **values}).check()
    RunConfig(defense="secagg-emulated", num_clients=1100).check()  # the emulation quantizes nothing
    assert SecAggParameters.of(RunConfig(secagg_shares=1.0, secagg_threshold=0.5)).shares == 1.0
    assert SecAggParameters.of(RunConfig(secagg_shares=5.0)).shares == 5


def test_the_client_answers_the_legacy_fit_instruction_with_a_legacy_fitres(shared_data, server_identity):
    """SecAgg+'s workflow sends FitIns and its mod reads a FitRes: the ClientApp (Message API) gets named arrays."""
    config = RunConfig(model="lenet", data_root=str(shared_data), attack="idlg", defense="secagg", num_clients=2,
                       train_mode="fedsgd", batch_size=2, max_shard=0)
    names = state_names(config)
    model = build_model("lenet", 1, 28, 10, seed=0).state_dict()
    assert tuple(model) == names
    parameters = ndarrays_to_parameters([tensor.numpy() for tensor in model.values()])
    msg = Message(compat.fitins_to_recorddict(FitIns(parameters, dict(config.training.to_config())), True),
                  dst_node_id=100, message_type=MessageType.TRAIN)
    seen = {}

    def train(message: Message, context) -> Message:
        seen.update(message.content.array_records["arrays"].to_torch_state_dict())
        trained = {name: tensor + 1 for name, tensor in seen.items()}
        return Message(RecordDict({"arrays": ArrayRecord(trained),
                                   "metrics": MetricRecord({"num-examples": 2, "train-loss": 0.5,
                                                            "partition-id": 1})}), reply_to=message)

    reply = legacy_fit(msg, None, train, names)
    assert all(torch.equal(seen[name], model[name]) for name in names)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert (fitres.num_examples, fitres.metrics) == (2, {"train-loss": 0.5, "partition-id": 1})
    assert all(np.array_equal(array, (model[name] + 1).numpy())
               for name, array in zip(names, parameters_to_ndarrays(fitres.parameters)))


def test_flowers_client_app_puts_secaggplus_outermost_and_fl_sim_runs_only_what_it_needs():
    assert [type(mod) for mod in make_client_app()._mods] == [ExpandRowsMod, SecAggPlusMod, FaultMod, DetectMod,
                                                              InspectMod, FlowerDpMods, DefenseMod]
    assert [type(mod) for mod in make_client_app(RunConfig(defense="secagg", inject_faults="1=crash"))._mods] == \
        [ExpandRowsMod, SecAggPlusMod, FaultMod]
    assert [type(mod) for mod in make_client_app(RunConfig(defense="secagg-emulated"))._mods] == [ExpandRowsMod]


def test_a_block_sent_as_its_distinct_rows_reaches_the_legacy_path_expanded_with_the_count_of_arrays_kept(
        shared_data, server_identity):
    """On SecAgg+'s legacy path the parameters are an unnamed list: the encoded block is one array in the block's
    place, expanded by the ClientApp's outermost mod before the legacy translation names the arrays."""
    config = RunConfig(model="mlp", data_root=str(shared_data), attack="mosaic", defense="secagg", num_clients=2,
                       train_mode="steps", batch_size=2, imprint_bins=64)
    names = state_names(config)
    model = build_model("mlp", 1, 28, 10, seed=0, imprint=64).state_dict()
    block = torch.zeros(64, 784, dtype=torch.float16)
    block[::2] = torch.linspace(-1, 1, 784, dtype=torch.float16)
    model["imprint.weight"] = block
    packed = pack_rows(block.numpy())
    arrays = [packed if name == "imprint.weight" else tensor.numpy() for name, tensor in model.items()]
    parameters = ndarrays_to_parameters(arrays)
    assert len(parameters.tensors) == len(names)
    msg = Message(compat.fitins_to_recorddict(FitIns(parameters, dict(config.training.to_config())), True),
                  dst_node_id=100, message_type=MessageType.TRAIN)
    seen = {}

    def train(message: Message, context) -> Message:
        seen.update(message.content.array_records["arrays"].to_torch_state_dict())
        return Message(RecordDict({"arrays": ArrayRecord(seen),
                                   "metrics": MetricRecord({"num-examples": 2, "train-loss": 0.5})}),
                       reply_to=message)

    ExpandRowsMod()(msg, None, functools.partial(legacy_fit, call_next=train, names=names))
    assert all(torch.equal(seen[name], model[name]) for name in names), [n for n in names
                                                                         if not torch.equal(seen[n], model[n])]


def test_the_mosaic_through_flowers_secagg_plus_reads_every_client_with_its_block_sent_as_distinct_rows(
        shared_data, tmp_path):
    """A real SecAgg+ round of the mosaic: the block travels as its distinct rows on the legacy path, every
    ClientApp expands it, trains the full block, and each client's images are read from the revealed sum."""
    out = tmp_path / "run"
    assert cli.main(["run", "--out", str(out), "--data-root", str(shared_data), "--num-clients", "4", "--rounds", "1",
                     "--model", "mlp", "--train-mode", "steps", "--batch-size", "4", "--attack", "mosaic",
                     "--defense", "secagg", "--secagg-max-weight", "4", "--secagg-quantization-range", "16777216",
                     "--secagg-clipping-range", "8", "--min-shard", "4", "--max-shard", "4", "--device", "cpu",
                     "--seed", "0"]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert sorted(row["client"] for row in rows) == [0, 1, 2, 3]
    psnr = np.concatenate([row["psnr_images"] for row in rows])
    assert len(psnr) == 16 and float(np.mean(psnr >= 30)) >= 0.75, psnr


def secagg_run(shared_data, out, defense: str, *extra: str) -> int:
    """4 MNIST clients of 8 images (FedSGD), one round, the imprint attack; client 1 crashes every round."""
    return cli.main(["run", "--out", str(out), "--data-root", str(shared_data), "--num-clients", "4", "--rounds", "1",
                     "--model", "cnn", "--train-mode", "fedsgd", "--batch-size", "8", "--attack", "imprint",
                     "--imprint-bins", "256", "--inject-faults", "1=crash", "--device", "cpu", "--seed", "3",
                     "--defense", defense, *extra])


def test_a_round_through_flowers_secagg_plus_survives_a_dropout_and_leaks_as_much_as_its_emulation(
        shared_data, tmp_path, caplog):
    """The real protocol and the emulation on the same federation (client 1 crashes after sharing its keys: a
    dropout SecAgg+ recovers from): both leave client 1 out, read the other three clients' aggregate as one
    victim, recover most of its 24 images, and agree on the new global model to the protocol's quantization."""
    real, emulated = tmp_path / "secagg", tmp_path / "emulated"
    assert secagg_run(shared_data, real, "secagg", *FINE) == 0
    assert secagg_run(shared_data, emulated, "secagg-emulated") == 0
    assert "EMULATED secure aggregate" in caplog.text
    rows = {name: read_jsonl(folder / "metrics.jsonl") for name, folder in (("real", real), ("emulated", emulated))}
    shares = {}
    for name, found in rows.items():
        fault, attacked = sorted(found, key=lambda row: str(row["client"]))
        assert (fault["client"], fault["status"]) == (1, "client-error")
        assert (attacked["client"], attacked["clients"], attacked["status"]) == ("aggregate", [0, 2, 3], "ok")
        assert attacked["secure_aggregation"] == {"real": "secagg+", "emulated": "emulated"}[name]
        assert len(attacked["psnr_images"]) == 24
        shares[name] = attacked["recovered_at_30db"]
    print(f"imprint through 3 of 4 clients' aggregate, share at >= 30 dB: {shares}")
    # the protocol's quantization (stochastic: Flower draws it unseeded) costs the imprint some images
    assert shares["emulated"] >= 0.9 and 0.5 <= shares["real"] <= shares["emulated"]
    [dropped] = [row for row in rows["real"] if row["client"] == 1]
    assert dropped["reason"] == ("dropped out of the SecAgg+ round (the protocol unmasked the others' sum without "
                                 "it): client 1: injected crash (inject-faults)")
    bound = SecAggParameters(3, 2, clipping_range=1, quantization_range=LEVELS, max_weight=8).resolution([8, 8, 8])
    after_real, after_emulated = load_checkpoint(real).weights, load_checkpoint(emulated).weights
    differences = [(after_real[name].double() - after_emulated[name].double()).abs().max().item()
                   for name in after_real if after_real[name].is_floating_point()]
    assert 0 < max(differences) <= bound + 1e-6  # float32 rounding of the stored weights on top
    config = {name: json.loads((folder / "run.json").read_text())["config"] for name, folder in
              (("real", real), ("emulated", emulated))}
    assert (config["real"]["defense"], config["emulated"]["defense"]) == ("secagg", "secagg-emulated")
    assert "secagg-emulated" in (emulated / "gallery.html").read_text()
    assert "secure aggregate (emulated)" in (emulated / "gallery.html").read_text()
    assert "secure aggregate (emulated)" not in (real / "gallery.html").read_text()


def test_clients_that_flag_their_model_through_flowers_secagg_plus_each_get_a_row(shared_data, tmp_path):
    """inspect:flag under SecAgg+: the server reads only the aggregate, and each survivor's flags (its FitRes
    metrics) still reach metrics.jsonl, a row for each client (the imprint's block is not the agreed model)."""
    out = tmp_path / "run"
    assert secagg_run(shared_data, out, "inspect:flag+secagg") == 0
    rows = {row["client"]: row for row in read_jsonl(out / "metrics.jsonl")}
    assert sorted(rows, key=str) == [0, 1, 2, 3, "aggregate"]
    assert rows[1]["status"] == "client-error" and rows["aggregate"]["clients"] == [0, 2, 3]
    for client in (0, 2, 3):
        assert rows[client]["status"] == FLAGGED and "architecture" in rows[client]["inspect_flags"], rows[client]


def test_ray_address_comes_from_the_flag_or_ray_address(monkeypatch):
    parser = argparse.ArgumentParser()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    run_command.add_arguments(parser)
    args = parser.parse_args([])
    assert run_command.backend_config(args)["init_args"] == {"address": "10.0.0.5:6379"}
    args = parser.parse_args(["--ray-address", "auto", "--client-cpus", "2"])
    assert run_command.backend_config(args) == {"client_resources": {"num_cpus": 2.0, "num_gpus": 0.0},
                                                "init_args": {"address": "auto"}}
    monkeypatch.delenv("RAY_ADDRESS")
    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    assert "init_args" not in run_command.backend_config(parser.parse_args([]))


def test_a_simulation_runs_on_a_two_node_ray_cluster_it_attaches_to(shared_data, tmp_path, monkeypatch):
    """A head and a second node on this machine, one CPU each: two clients of one CPU each need both nodes.
    The run attaches (--ray-address), finishes, and its client actors lived on both of the cluster's nodes (the
    cluster's actor table keeps them); the cluster outlives the run with both nodes, and is then torn down."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.delenv("RAY_ADDRESS", raising=False)  # Cluster sets it: the flag alone must attach the run
        out = tmp_path / "run"
        assert cli.main(["run", "--out", str(out), "--data-root", str(shared_data), "--num-clients", "2",
                         "--rounds", "1", "--model", "lenet", "--train-mode", "fedsgd", "--batch-size", "2",
                         "--attack", "none", "--device", "cpu", "--ray-address", cluster.address]) == 0
        assert load_checkpoint(out).server_round == 1
        assert [row["model_changed"] for row in read_jsonl(out / "global.jsonl")] == [True]
        ray.init(address=cluster.address)
        try:
            alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
            assert len(alive) == 2 and ray.cluster_resources()["CPU"] == 2
            actors = [actor for actor in ray._private.state.actors().values()
                      if actor.get("ActorClassName") == "ClientAppActor" and actor.get("State") == "DEAD"]
            assert {actor["Address"]["NodeID"] for actor in actors} == alive
        finally:
            ray.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


class TrickleGrid:
    """A grid whose replies come a few per pull: each node's reply holds a masked vector (two int64 arrays), as a
    SecAgg+ client's reply to the masked-vector stage does; node 103's reply is an error."""

    pull_interval = 0.0

    def __init__(self, vectors: dict[int, list[np.ndarray]]):
        self.vectors, self.queue = vectors, list[Message]()
        self.pushed = self.most_held = 0  # messages pushed, and the most held unanswered at once

    def push_messages(self, messages):
        ids = []
        for message in messages:
            number, self.pushed = self.pushed, self.pushed + 1
            node = message.metadata.dst_node_id
            if node == 103:
                reply = Message(Error(code=0, reason="crashed"), reply_to=message)
            else:
                record = ConfigRecord({SecAggKey.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in self.vectors[node]]})
                reply = Message(RecordDict({SECAGG_CONFIGS: record}), reply_to=message)
            reply.metadata.__dict__["_reply_to_message_id"] = f"m{number}"  # as a SuperLink stamps it
            self.queue.append(reply)
            ids.append(f"m{number}")
        self.most_held = max(self.most_held, len(self.queue))
        return ids

    def pull_messages(self, ids):
        arrived, self.queue = self.queue[:2], self.queue[2:]
        return [reply for reply in arrived if reply.metadata.reply_to_message_id in ids]


def test_the_summing_grid_hands_flowers_workflow_the_same_sum_one_vector_at_a_time(server_identity):
    """SummingGrid folds each masked vector into one sum as it arrives: the replies it returns, summed as Flower's
    workflow sums them (every reply's vector, then modulo 2^32), give the sum of the vectors; only the first
    holds a vector of full size, the error reply passes through untouched."""
    generator = np.random.default_rng(0)
    vectors = {node: [generator.integers(0, 2**32, size=(3, 4)), generator.integers(0, 2**32, size=(5,))]
               for node in (100, 101, 102, 104)}
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in range(100, 105)]
    replies = list(SummingGrid(TrickleGrid(vectors)).send_and_receive(messages))
    assert_summed(replies, vectors)


def test_the_summing_grid_holds_at_most_its_window_of_messages_with_flower_and_sums_all(server_identity):
    """With an in-flight window (Flower's simulation: its engine scans every stored message for every node), the
    grid hands the wrapped grid the next message only as a reply comes back, and still returns every reply, summed;
    with a timeout it pushes all at once (a client left unsent would count as dropped)."""
    generator = np.random.default_rng(2)
    vectors = {node: [generator.integers(0, 2**32, size=(3, 4)), generator.integers(0, 2**32, size=(5,))]
               for node in (100, 101, 102, 104, 105, 106, 107)}
    for in_flight, timeout, most in ((3, None, 3), (1, None, 1), (3, 60.0, 8)):
        messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in range(100, 108)]
        wrapped = TrickleGrid(vectors)
        replies = list(SummingGrid(wrapped, in_flight=in_flight).send_and_receive(messages, timeout=timeout))
        assert wrapped.most_held == most
        assert_summed(replies, vectors)


def assert_summed(replies: list[Message], vectors: dict[int, list[np.ndarray]]) -> None:
    """Every node's reply came back (103's an error), one of them carries the sum of all the masked vectors."""
    assert len(replies) == len(vectors) + 1 and sum(reply.has_error() for reply in replies) == 1
    held = [[bytes_to_ndarray(entry) for entry in cast(list[bytes], reply.content.config_records[SECAGG_CONFIGS][
        SecAggKey.MASKED_PARAMETERS])] for reply in replies if not reply.has_error()]
    assert sorted(array.size for arrays in held for array in arrays) == [1] * (2 * len(vectors) - 2) + [5, 12]
    total = held[0]
    for arrays in held[1:]:
        total = [a + b for a, b in zip(total, arrays)]
    for got, want in zip(total, [sum(vectors[node][i] for node in vectors) for i in range(2)]):
        assert np.array_equal(got % SECAGG_MODULUS, want % SECAGG_MODULUS)


def test_a_folded_vector_is_the_sum_modulo_the_modulus_in_place():
    """`fold` adds a masked vector into the running sum in place, modulo a power of two (a bit mask) or any other
    modulus; values near the modulus wrap, none overflows."""
    generator = np.random.default_rng(1)
    for modulus in (SECAGG_MODULUS, 1000):
        running, added = generator.integers(0, modulus, 4096), generator.integers(0, modulus, 4096)
        running[:2], added[:2] = modulus - 1, modulus - 1
        want, held = (running + added) % modulus, running
        fold(running, added, modulus)
        assert running is held and np.array_equal(running, want)
