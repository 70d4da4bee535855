"""Partitions and round examples: disjoint, complete, skewed as asked, and reproducible from the seed alone."""
import numpy as np
import pytest

from fl_sim.learning.data import load_dataset
from fl_sim.learning.partition import partition_indices, round_examples


@pytest.fixture(scope="module")
def mnist_labels(shared_data):
    return load_dataset("mnist", shared_data, train=True).labels


def _classes_per_partition(labels, parts, min_share=0.05):
    """How many classes make up at least `min_share` of each partition."""
    counts = []
    for part in parts:
        shares = np.bincount(labels[part], minlength=10) / len(part)
        counts.append(int((shares >= min_share).sum()))
    return counts


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_training_set(mnist_labels, scheme):
    parts = partition_indices(mnist_labels, 7, scheme, alpha=0.3, seed=4)
    assert len(parts) == 7
    joined = np.concatenate(parts)
    assert len(joined) == len(mnist_labels)
    assert np.array_equal(np.sort(joined), np.arange(len(mnist_labels)))


def test_iid_partitions_are_balanced_and_mixed(mnist_labels):
    parts = partition_indices(mnist_labels, 5, "iid", seed=0)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _classes_per_partition(mnist_labels, parts) == [10] * 5


def test_small_alpha_skews_labels_and_large_alpha_does_not(mnist_labels):
    skewed = _classes_per_partition(mnist_labels, partition_indices(mnist_labels, 10, "dirichlet", 0.1, seed=0))
    mixed = _classes_per_partition(mnist_labels, partition_indices(mnist_labels, 10, "dirichlet", 100.0, seed=0))
    assert np.mean(skewed) < 5, skewed
    assert min(mixed) >= 9, mixed


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_follow_the_seed(mnist_labels, scheme):
    first = partition_indices(mnist_labels, 4, scheme, alpha=0.5, seed=3)
    again = partition_indices(mnist_labels, 4, scheme, alpha=0.5, seed=3)
    other = partition_indices(mnist_labels, 4, scheme, alpha=0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_dirichlet_keeps_every_partition_at_least_min_size(mnist_labels):
    parts = partition_indices(mnist_labels, 20, "dirichlet", alpha=0.05, seed=1, min_size=50)
    assert min(len(part) for part in parts) >= 50


def test_impossible_partitions_fail_clearly(mnist_labels):
    with pytest.raises(ValueError, match="raise alpha or use fewer clients"):
        partition_indices(mnist_labels, 100, "dirichlet", alpha=0.01, seed=0, min_size=140)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition_indices(mnist_labels, 2, "shards")
    with pytest.raises(ValueError, match="cannot give"):
        partition_indices(mnist_labels[:10], 20)


def test_round_examples_are_distinct_members_drawn_from_seed_partition_and_round(mnist_labels):
    partition = partition_indices(mnist_labels, 4, "iid", seed=0)[2]
    examples = round_examples(partition, 16, seed=0, partition_id=2, server_round=3)
    assert len(set(examples.tolist())) == 16
    assert np.isin(examples, partition).all()
    assert np.array_equal(examples, round_examples(partition, 16, seed=0, partition_id=2, server_round=3))
    for changed in ({"seed": 1}, {"partition_id": 1}, {"server_round": 4}):
        arguments = {"seed": 0, "partition_id": 2, "server_round": 3, **changed}
        assert not np.array_equal(examples, round_examples(partition, 16, **arguments)), changed


def test_a_round_larger_than_the_partition_fails_clearly():
    with pytest.raises(ValueError, match="holds 3 examples; a round needs 4"):
        round_examples(np.arange(3), 4, seed=0, partition_id=0, server_round=1)
