"""Splitting a training set among clients, and picking each client's examples for a round.

Both are pure functions of the seed (and partition, round). Clients call them to know their data; the
server's evaluation path calls the same functions to re-derive what a client trained on, so it can
score a reconstruction against the truth. A real server could not do that: only scoring uses it,
never the attack.
"""
import numpy as np

from fl_sim.contract.names import PARTITIONS

_IID_STREAM, _DIRICHLET_STREAM, _SHARD_STREAM = 1, 2, 3  # keep the random streams apart
MAX_DIRICHLET_DRAWS = 100


def partition_indices(labels, num_partitions: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
                      min_size: int = 1) -> list[np.ndarray]:
    """The example indices of each of `num_partitions` disjoint partitions (sorted, int64).

    `iid`: a seeded shuffle cut into near-equal parts. `dirichlet`: for every class, its examples are
    shared out in proportions drawn from Dirichlet(alpha) (small alpha: each client sees few classes);
    the draw is repeated until every partition holds at least `min_size` examples.
    """
    labels = np.asarray(labels)
    if num_partitions < 1:
        raise ValueError(f"need at least one partition, got {num_partitions}")
    if seed < 0:
        raise ValueError(f"the seed must be non-negative, got {seed}")
    if len(labels) < num_partitions * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {num_partitions} partitions {min_size} examples each")
    if scheme == "iid":
        rng = np.random.default_rng([seed, _IID_STREAM])
        parts = np.array_split(rng.permutation(len(labels)), num_partitions)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        parts = _dirichlet(labels, num_partitions, alpha, np.random.default_rng([seed, _DIRICHLET_STREAM]), min_size)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}: choose one of {', '.join(PARTITIONS)}")
    return [np.sort(part).astype(np.int64) for part in parts]


def _dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, rng, min_size: int) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_DRAWS):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for partition, piece in enumerate(np.split(members, cuts)):
                shares[partition].append(piece)
        parts = [np.concatenate(pieces) for pieces in shares]
        if min(len(part) for part in parts) >= min_size:
            return parts
    raise ValueError(f"Dirichlet(alpha={alpha}) left some of {num_partitions} partitions with fewer than {min_size} "
                     f"examples in {MAX_DIRICHLET_DRAWS} draws: raise alpha or use fewer clients")


def round_examples(partition: np.ndarray, count: int, seed: int, partition_id: int, server_round: int) -> np.ndarray:
    """The `count` distinct examples (indices, in training order) a client trains on in a round.

    Drawn from (seed, partition id, round) alone, so anyone holding the seed gets the same ones.
    """
    if count > len(partition):
        raise ValueError(f"partition {partition_id} holds {len(partition)} examples; a round needs {count} (K x B)")
    if min(seed, partition_id, server_round) < 0:
        raise ValueError("seed, partition id and round must be non-negative")
    rng = np.random.default_rng([seed, partition_id, server_round])
    return np.asarray(partition)[rng.choice(len(partition), size=count, replace=False)]


def client_shards(labels, num_clients: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
                  min_shard: int = 1, max_shard: int = 0) -> list[np.ndarray]:
    """Each client's shard: its partition, cut to a size drawn uniformly from [min_shard, max_shard] when
    `max_shard` is set (quantity skew: clients hold different amounts of data), else the whole partition.

    Clients and the evaluation path both call this, with the run's settings, and get the same shards.
    """
    parts = partition_indices(labels, num_clients, scheme, alpha, seed, min_size=max(1, min_shard))
    if not max_shard:
        return parts
    rng = np.random.default_rng([seed, _SHARD_STREAM])
    sizes = rng.integers(min_shard, max_shard + 1, size=num_clients)
    return [np.sort(rng.permutation(part)[:size]) for part, size in zip(parts, sizes)]


def training_examples(shard: np.ndarray, settings, seed: int, client: int, server_round: int) -> np.ndarray:
    """What a client trains on in a round: its whole shard in epochs mode (it shuffles them itself, see
    clients/training.py), else the K x B examples drawn for the round (`round_examples`)."""
    if settings.mode == "epochs":
        return np.asarray(shard)
    return round_examples(shard, settings.num_images, seed, client, server_round)
