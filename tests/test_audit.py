"""`fl_sim.malicious` in a Flower app of the user's own: a Message-API ClientApp written as users write them (its own
model, loaded strictly; its own metrics; no partition id, no truth), driven in this process by the wrapped strategy's
own `start`."""
import json
from pathlib import Path
from typing import cast

import pytest
import torch
from flower_helpers import node_context
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

import fl_sim
from fl_sim.learning.data import image_folder
from fl_sim.results.nearest import Reference, nearest, nearest_scores
from fl_sim.results.rows import read_metrics
from fl_sim.server.refusal import RunRefused

B = 4
NORMALIZE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
pytestmark = pytest.mark.usefixtures("server_identity")


def user_net() -> nn.Module:
    """A user's own MLP, the same initial weights on both sides."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def cifar(shared_data):
    folder = Path(shared_data) / "cifar10-subset" / "train"
    assert folder.is_dir(), f"the CIFAR-10 subset is missing: {folder}"
    return folder


def user_app(folder: Path, disclose: bool = False, failing: int | None = None) -> ClientApp:
    """A ClientApp as a Flower user writes one: its own model, strict load, SGD, metrics of its own choosing."""
    data = image_folder(folder, "cifar10")
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == failing:
            raise RuntimeError("this client's disk is full")
        model = user_net()
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())  # strict, as users load
        images, labels = data.tensors(range(50 * partition, 50 * partition + B))
        inputs = (images - 0.5) / 0.5
        lr = float(cast(float, msg.content.config_records["config"]["lr"]))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train_loss": loss.item(), "num-examples": B})})
        if disclose:
            fl_sim.disclose(content, (inputs, labels))
        return Message(content, reply_to=msg)

    return app


class InProcessGrid:
    """Nodes 100, 101, ... running the ClientApp here; a ClientApp that raises gets an error reply."""

    def __init__(self, app: ClientApp, nodes: int):
        self.app, self.nodes = app, nodes

    def get_node_ids(self):
        return [100 + i for i in range(self.nodes)]

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error

        replies = []
        for msg in messages:
            try:
                replies.append(self.app(msg, node_context(msg.metadata.dst_node_id - 100, self.nodes)))
            except Exception as error:
                replies.append(Message(Error(code=0, reason=str(error)), reply_to=msg))
        return replies


def server_context(**run_config) -> Context:
    return Context(run_id=1, node_id=0, state=RecordDict(), node_config={},
                   run_config={"batch-size": B, "local-epochs": 1, "audit-iterations": 2, **run_config})


def audit(cifar, out, app, *, rounds=2, nodes=3, attack="ig", model=None, **arguments):
    flower = FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes)
    strategy = fl_sim.malicious(flower, model=model or user_net(), context=server_context(),
                                attack=attack, out=out, reference=cifar, normalize=NORMALIZE, momentum=0.9,
                                device="cpu", **arguments)
    result = strategy.start(grid=InProcessGrid(app, nodes), initial_arrays=ArrayRecord(user_net().state_dict()),
                            num_rounds=rounds, train_config=ConfigRecord({"lr": 0.1}))
    return strategy, result


def test_every_client_of_every_round_gets_a_row_named_by_its_node_id(cifar, tmp_path):
    out = tmp_path / "audit"
    strategy, _ = audit(cifar, out, user_app(cifar, failing=2))

    rows = read_metrics(out / "metrics.jsonl")
    assert sorted((row.round, row.client) for row in rows) == [(r, c) for r in (1, 2) for c in (100, 101, 102)]
    attacked = [row for row in rows if row.client != 102]
    assert all(row.status == "ok" and row.scored_against and "nearest image" in row.scored_against
               for row in attacked)
    assert all(row.num_examples == B and len(row.psnr_images or []) == B for row in attacked)
    failed = [row for row in rows if row.client == 102]
    assert all(row.status == "client-error" and "disk is full" in (row.reason or "") for row in failed)
    assert (out / "round-002" / "client-101" / "reconstruction.png").is_file()
    assert (out / "round-002" / "client-101" / "truth.png").is_file()
    assert "client 101" in (out / "gallery.html").read_text()
    assert json.loads((out / "run.json").read_text())["audit"]["attack"] == "ig"
    assert strategy.sent_round is not None and strategy.sent_round.settings.batch_size == B


def test_what_a_client_discloses_is_scored_exactly_and_never_aggregated(cifar, tmp_path):
    out = tmp_path / "audit"
    _, result = audit(cifar, out, user_app(cifar, disclose=True), rounds=1, nodes=2)
    _, plain = audit(cifar, tmp_path / "plain", user_app(cifar), rounds=1, nodes=2)

    rows = read_metrics(out / "metrics.jsonl")
    assert [row.scored_against for row in rows] == ["what the client disclosed"] * 2
    assert all(row.true_labels is not None and len(row.true_labels) == B for row in rows)
    mine, theirs = result.arrays.to_torch_state_dict(), plain.arrays.to_torch_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_an_earlier_audit_in_the_folder_is_kept(cifar, tmp_path):
    out = tmp_path / "audit"
    audit(cifar, out, user_app(cifar), rounds=1, nodes=1)
    audit(cifar, out, user_app(cifar), rounds=1, nodes=1)
    assert (out / "metrics.jsonl").is_file() and (tmp_path / "audit-2" / "metrics.jsonl").is_file()
    assert len(read_metrics(out / "metrics.jsonl")) == 1


@pytest.mark.parametrize(("arguments", "says"), [
    ({"attack": "imprint"}, "strictly"),
    ({"attack": "nope"}, "unknown attack 'nope'"),
    ({"loss": "mse"}, "cross_entropy only"),
    ({"options": {"no_such_option": 1}}, "unknown attack option"),
])
def test_an_audit_that_cannot_run_is_refused_in_one_line(cifar, tmp_path, arguments, says):
    with pytest.raises(RunRefused, match=says) as refused:
        fl_sim.malicious(FedAvg(), model=user_net(), context=server_context(), out=tmp_path, reference=cifar,
                         **arguments)
    assert "\n" not in str(refused.value)


def test_a_model_that_cannot_take_the_images_is_refused(cifar, tmp_path):
    mnist_sized = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with pytest.raises(RunRefused, match="cannot take images of shape"):
        fl_sim.malicious(FedAvg(), model=mnist_sized, context=server_context(), out=tmp_path, reference=cifar)


def test_a_model_that_is_not_the_strategys_is_refused_before_round_one(cifar, tmp_path):
    wider = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 65), nn.ReLU(), nn.Linear(65, 10))
    with pytest.raises(RunRefused, match="not the one the strategy starts from"):
        audit(cifar, tmp_path / "audit", user_app(cifar), model=wider)
    assert not (tmp_path / "audit" / "metrics.jsonl").exists()


def test_the_training_it_cannot_find_is_named_before_round_one(cifar, tmp_path):
    strategy = fl_sim.malicious(FedAvg(), model=user_net(), context=server_context(**{"batch-size": None}),
                                out=tmp_path, reference=cifar, batch_size_key="bs")
    with pytest.raises(RunRefused, match="the batch size \\('bs'\\)"):
        strategy.start(grid=InProcessGrid(user_app(cifar), 2), initial_arrays=ArrayRecord(user_net().state_dict()),
                       num_rounds=1, train_config=ConfigRecord({"lr": 0.1}))


def test_the_run_config_overrides_the_arguments(cifar, tmp_path):
    context = server_context(**{"audit-attack": "idlg", "audit-max-images": 3})
    strategy = fl_sim.malicious(FedAvg(), model=user_net(), context=context, attack="ig", out=tmp_path,
                                reference=cifar)
    assert (strategy.audit.attack, strategy.audit.max_images, strategy.audit.options) == ("idlg", 3, {"iterations": 2})


def test_nearest_finds_each_reconstruction_and_counts_each_reference_image_once():
    generator = torch.Generator().manual_seed(0)
    reference = Reference.of(torch.rand(300, 3, 8, 8, generator=generator), torch.arange(300) % 10, "random")
    picked = reference.images(torch.tensor([7, 150, 299, 7]))
    noisy = (picked + 0.003 * torch.randn(picked.shape, generator=generator)).clamp(0, 1)
    unrelated = torch.rand(1, 3, 8, 8, generator=generator)
    images = torch.cat([noisy, unrelated])

    index, _ = nearest(images, reference)
    scores, matched = nearest_scores(images, None, reference, count=5)

    assert index[:4].tolist() == [7, 150, 299, 7]
    assert scores["recovered_at_40db"] == pytest.approx(3 / 5)  # image 7 twice counts once; the unrelated one not
    assert scores["psnr_images"][4] < 20 and min(scores["psnr_images"][:4]) > 40
    assert torch.equal(matched[0], reference.images(torch.tensor([7]))[0])


def wide_net() -> nn.Module:
    """A user's MLP wide enough for the parameter-only attacks' rows."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 10))


def test_a_parameter_only_attack_reads_a_users_mlp_that_loads_what_it_is_sent_strictly(cifar, tmp_path, monkeypatch):
    """qbi sets values of the user's own first layer: the stock client loads them strictly, and one step of B images
    gives most of them back exactly, scored against the nearest reference images."""
    monkeypatch.setitem(globals(), "user_net", wide_net)  # the ClientApp builds this MLP
    out = tmp_path / "audit"
    audit(cifar, out, user_app(cifar), rounds=1, nodes=2, attack="qbi", model=wide_net(), public=cifar.parent / "test")

    rows = read_metrics(out / "metrics.jsonl")
    assert [row.status for row in rows] == ["ok", "ok"]
    assert all((row.recovered_at_40db or 0) >= 0.5 for row in rows), [row.recovered_at_40db for row in rows]


def test_spear_reads_a_users_mlp_exactly_without_changing_it(cifar, tmp_path):
    """The passive exact attack on the user's own linear first layer: the batch back from the gradient's rank and the
    ReLU's zeros, each layer input mapped back through the declared normalization into pixels."""
    out = tmp_path / "audit"
    audit(cifar, out, user_app(cifar), rounds=1, nodes=2, attack="spear")

    rows = read_metrics(out / "metrics.jsonl")
    assert [row.status for row in rows] == ["ok", "ok"], [row.reason for row in rows]
    assert all((row.recovered_at_40db or 0) == 1.0 for row in rows), [row.recovered_at_40db for row in rows]
