"""One round function for both faces of the malicious server: the plain strategy's `aggregate_train` and the SecAgg+
face's `aggregate_revealed` both end their round with fl_sim/server/round.py `end_round`, given the same
`RoundServer`, and neither records nor aggregates by itself."""
import pytest
from flower_helpers import LocalGrid, Recorder, inverting_fedavg, lenet, plain_config
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from attacker import TrainingSettings
from clients.app import make_client_app
from fl_sim.contract.protocol import ARRAYS, METRICS, NUM_EXAMPLES, PARTITION_ID, TRAIN_LOSS
from fl_sim.server import round as rounds
from fl_sim.server.secagg import SecAggParameters, SecAggPlusFace, protocol_aggregate
from fl_sim.server.strategy import Victim

SETTINGS = TrainingSettings(lr=0.1, local_steps=1, batch_size=1)
CLIENTS = 2
pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.fixture(scope="module")
def client_app(shared_data, tmp_path_factory):
    return make_client_app(plain_config(out=str(tmp_path_factory.mktemp("out")), num_clients=CLIENTS,
                                        data_root=str(shared_data), train_mode="steps", batch_size=1, model="lenet"))


@pytest.fixture
def calls(monkeypatch):
    """Every call of the one round function, which still runs: (server, round, replies it aggregates)."""
    seen = []
    original = rounds.end_round

    def spy(server, sent, replies, **options):
        seen.append((server, sent.server_round, len(replies)))
        return original(server, sent, replies, **options)

    monkeypatch.setattr(rounds, "end_round", spy)
    return seen


def test_the_plain_strategy_ends_its_round_with_the_one_round_function(client_app, calls):
    sink = Recorder()
    strategy = inverting_fedavg(sink, CLIENTS, "idlg", 1)
    grid = LocalGrid(client_app, CLIENTS)
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(lenet().state_dict()),
                                                             ConfigRecord(SETTINGS.to_config()), grid))

    arrays, _ = strategy.aggregate_train(1, replies)

    assert calls == [(strategy.round_server, 1, CLIENTS)]
    assert arrays is not None and [victims for _, victims, _ in sink] == [[Victim((0,)), Victim((1,))]]


def test_the_secagg_face_ends_its_round_with_the_same_function(client_app, calls):
    """The revealed aggregate (SecAgg+'s arithmetic without masks) goes through `end_round` as one reply, read
    as one secure-aggregate victim, with the strategy's own RoundServer: no attribute of the strategy's used."""
    sink = Recorder()
    strategy = inverting_fedavg(sink, CLIENTS, "idlg", 1, secure_aggregation=True)
    initial = lenet().state_dict()
    names = tuple(initial)
    protocol = SecAggParameters(shares=CLIENTS, threshold=CLIENTS)
    grid = LocalGrid(client_app, CLIENTS)
    face = SecAggPlusFace(strategy, strategy.round_server, grid, protocol, names=names, initial=initial,
                          train_config=ConfigRecord(SETTINGS.to_config()), round_end=lambda server_round, arrays: None)
    messages = strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(SETTINGS.to_config()), grid)
    replies = {msg.metadata.dst_node_id: grid.reply(msg) for msg in messages}
    weights = [reply.content.array_records[ARRAYS].to_torch_state_dict() for reply in replies.values()]
    counts = [int(reply.content[METRICS][NUM_EXAMPLES]) for reply in replies.values()]
    aggregate = protocol_aggregate(weights, counts, protocol)
    parameters = ndarrays_to_parameters([aggregate[name].float().numpy() for name in names])
    survivors = {node: FitRes(Status(Code.OK, ""), parameters, count, {
        PARTITION_ID: int(reply.content[METRICS][PARTITION_ID]), TRAIN_LOSS: 0.5})
        for (node, reply), count in zip(replies.items(), counts)}

    arrays, _ = face.aggregate_revealed(1, survivors, [])

    assert calls == [(strategy.round_server, 1, 1)]
    assert arrays is not None
    [(server_round, victims, _)] = sink
    assert server_round == 1 and victims == [Victim((0, 1), secure_aggregate=True)]
