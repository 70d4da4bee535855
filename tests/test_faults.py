"""Injected faults: each kind, sent by the real ClientApp, is left out of the attack and the average and
recorded with its reason; and a real 5-client simulation with three faulty clients finishes its rounds."""
import pytest
import torch
from flower_helpers import LocalGrid, Recorder, inverting_fedavg, lenet, plain_config
from flwr.app import ArrayRecord, ConfigRecord

from attacker import Reconstruction, Status, TrainingSettings
from clients.app import make_client_app
from fl_sim.commands import cli
from fl_sim.commands.config import ConfigError
from fl_sim.contract.faults import Fault, format_faults, parse_faults
from fl_sim.contract.protocol import PARTITION_ID
from fl_sim.contract.records import ReplyStatus
from fl_sim.contract.run_config import RunConfig
from fl_sim.results.outputs import read_jsonl
from fl_sim.server.resume import load_checkpoint
from fl_sim.server.server_app import Scoreboard
from fl_sim.server.strategy import ReplyFault, Victim

REJECTED, CLIENT_ERROR = ReplyStatus.REJECTED, ReplyStatus.CLIENT_ERROR

DECLARED = TrainingSettings(lr=0.1, local_steps=1, batch_size=1)
# What the server says about each fault (client 0 has it, client 1 is healthy).
EXPECTED = {
    "nan": (REJECTED, "array 'features.0.weight' is not finite (NaN or infinity)"),
    "inf": (REJECTED, "array 'features.0.weight' is not finite (NaN or infinity)"),
    "wrong-shape": (REJECTED, "array 'features.0.weight' has shape (13, 1, 5, 5), the model's is (12, 1, 5, 5)"),
    "wrong-dtype": (REJECTED, "array 'features.0.weight' is float64, the model's is float32"),
    "missing-array": (REJECTED, "arrays missing: ['classifier.bias']"),
    "extra-array": (REJECTED, "arrays the model does not have: ['injected.extra']"),
    "bad-num-examples": (REJECTED, "num-examples is 1000000000, the round asked for 1"),
    "no-num-examples": (REJECTED, "no num-examples in the reply's metrics"),
    "crash": (CLIENT_ERROR, "client 0: injected crash (inject-faults)"),
}
pytestmark = pytest.mark.usefixtures("server_identity")


def test_every_fault_kind_has_a_test():
    assert set(EXPECTED) == set(Fault)


@pytest.mark.parametrize("kind", sorted(Fault))
def test_a_faulty_reply_is_neither_attacked_nor_averaged_and_is_recorded(kind, shared_data, tmp_path):
    config = plain_config(out=str(tmp_path), num_clients=2, data_root=str(shared_data), inject_faults={0: kind},
                       train_mode="steps", batch_size=1, model="lenet")
    grid = LocalGrid(make_client_app(config), num_clients=2)
    recorder = Recorder()
    strategy = inverting_fedavg(recorder)
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(lenet().state_dict()),
                                                             ConfigRecord(DECLARED.to_config()), grid))
    healthy = next(r for r in replies if not r.has_error() and r.content["metrics"].get(PARTITION_ID) == 1)
    healthy_weights = healthy.content["arrays"].to_torch_state_dict()

    arrays, _ = strategy.aggregate_train(1, replies)

    [(server_round, fault)] = recorder.faults
    status, reason = EXPECTED[kind]
    assert (server_round, fault.client, fault.status) == (1, 0, status)
    assert reason in fault.reason
    assert [victims for _, victims, _ in recorder] == [[Victim((1,))]]
    for name, tensor in arrays.to_torch_state_dict().items():  # the average is the healthy client alone
        torch.testing.assert_close(tensor, healthy_weights[name])


def test_fault_lists_parse_and_bad_ones_are_said_in_one_sentence():
    faults = parse_faults(" 2=crash, 0=nan ,")
    assert faults == {0: "nan", 2: "crash"} and parse_faults(format_faults(faults)) == faults
    assert parse_faults("") == {}
    for text, message in {"0=melt": "unknown fault 'melt'", "zero=nan": "client=kind pairs",
                          "1=nan,1=crash": "names client 1 twice"}.items():
        with pytest.raises(ConfigError, match=message):
            parse_faults(text)
    with pytest.raises(ConfigError, match=r"names \[3\], not clients 0..2"):
        RunConfig(num_clients=3, inject_faults={3: "nan"}).check()
    assert RunConfig.from_flower({"inject-faults": "1=crash"}).inject_faults == {1: "crash"}


def test_a_federation_with_three_faulty_clients_trains_and_attacks_the_others(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["run", "--train-mode", "steps", "--batch-size", "1", "--model", "lenet", "--dataset", "mnist",
             "--data-root", str(shared_data), "--num-clients", "5", "--rounds", "2",
             "--attack", "idlg", "--restarts", "1", "--iterations", "5", "--seed", "3", "--out", str(out),
             "--inject-faults", "0=nan,1=wrong-shape,2=crash"]
    assert cli.main(flags) == 0
    assert ("2 round(s), 10 client update(s): 4 attacked (4 with images recovered at >= 30 dB, 0 without, 0 failed), "
            "0 skipped (not read by the attack), 6 left out (faulty replies)") in capsys.readouterr().out

    assert [row["round"] for row in read_jsonl(out / "global.jsonl")] == [1, 2]
    rows = {(row["round"], row["client"]): row for row in read_jsonl(out / "metrics.jsonl")}
    assert sorted(rows) == [(r, c) for r in (1, 2) for c in range(5)]
    for server_round in (1, 2):
        for client in (3, 4):
            assert rows[server_round, client]["status"] == "ok" and rows[server_round, client]["psnr"] > 30
        assert rows[server_round, 0]["status"] == REJECTED and "not finite" in rows[server_round, 0]["reason"]
        assert rows[server_round, 1]["status"] == REJECTED and "has shape" in rows[server_round, 1]["reason"]
        assert rows[server_round, 2]["status"] == CLIENT_ERROR
        assert rows[server_round, 2]["reason"] == "error reply: client 2: injected crash (inject-faults)"
    checkpoint = load_checkpoint(out)
    initial = lenet().state_dict()
    assert checkpoint.server_round == 2
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint.weights.values())
    assert any(not torch.equal(checkpoint.weights[name], initial[name]) for name in initial)  # it trained
    gallery = (out / "gallery.html").read_text()
    assert "injected crash" in gallery and "not finite" in gallery


def test_the_scoreboard_records_failed_attacks_and_left_out_replies_with_reasons(shared_data, tmp_path):
    scoreboard = Scoreboard(plain_config(out=str(tmp_path), num_clients=3, data_root=str(shared_data),
                                      train_mode="steps", batch_size=1, model="lenet"))
    scoreboard.record_faults(2, [ReplyFault(0, CLIENT_ERROR, "error reply: boom")])
    scoreboard.record_attack(2, [Victim((1,)), Victim((2,))],
                             [Reconstruction.failure(Status.BAD_UPDATE, "ValueError: update has no 'fc.weight'"),
                              Reconstruction.failure(Status.DIVERGED, "every restart of the attack diverged")],
                             update_norms=[0.5, 0.7], seconds=1.0)
    rows = {row["client"]: row for row in read_jsonl(tmp_path / "metrics.jsonl")}
    assert {client: (row["round"], row["status"], row["reason"]) for client, row in rows.items()} == {
        0: (2, CLIENT_ERROR, "error reply: boom"),
        1: (2, "attack-error", "ValueError: update has no 'fc.weight'"),
        2: (2, "diverged", "every restart of the attack diverged")}
    assert rows[1]["update_norm"] == 0.5 and rows[2]["update_norm"] == 0.7
    assert all(row["psnr"] is None for row in rows.values())
