"""What DP-SGD (`--defense dpsgd:...`) has spent: epsilon for a round and for the run so far, by Opacus' accountant.

The accountant is Opacus' RDP accountant (`opacus.accountants.RDPAccountant`, Renyi DP of the subsampled
Gaussian mechanism, converted to (epsilon, delta) at the run's delta). Its inputs are what the client knows:

- the noise multiplier Z of the spec;
- the sample rate q = B / n: a batch of B out of the client's shard of n examples (in steps mode the round's
  K x B examples are drawn from that shard, in epochs mode the batches cover it);
- the steps: a round's optimiser steps (K x E in steps mode, ceil(n / B) x E in epochs mode), and through round
  r, r times that.

The cumulative count is derived from the round number and the settings, not counted in the client's state:
Flower's simulation may build a new ClientApp context for a node (and `fl-sim run --resume` starts new
clients), so a counter could restart at 0 and understate what was spent. Deriving it assumes the client trained
in every round up to this one; a client that sat out rounds (--fraction-train below 1) spent less, so its
reported figure is an upper bound. The batches are the fixed K x B of the round, not Poisson-sampled as the
accountant's amplification by subsampling assumes: like most DP-SGD code that trains on shuffled batches, the
figure is the one reported in practice, not a proof (docs/threat-models.md).
"""
from opacus.accountants import RDPAccountant

from fl_sim.contract.defenses import DpSgd
from fl_sim.contract.protocol import TrainingSettings

DP_STREAM = 3  # defense_seed's last key for DP-SGD's noise: apart from the defense's draws and the shuffle's (2)


def round_steps(settings: TrainingSettings, shard_size: int) -> int:
    """The optimiser steps of one round's local training on a shard of `shard_size` examples."""
    return settings.for_shard(shard_size).steps_per_epoch * settings.epochs


def sample_rate(settings: TrainingSettings, shard_size: int) -> float:
    """The share of the client's data one step uses: B / n (at most 1)."""
    return min(1.0, settings.batch_size / shard_size)


def epsilon(dp: DpSgd, rate: float, steps: int) -> float:
    """Epsilon at `dp.delta` after `steps` steps of noise multiplier `dp.noise` at sample rate `rate`."""
    accountant = RDPAccountant()
    accountant.history = [(dp.noise, rate, steps)]  # the accountant's own record of `steps` identical steps
    return float(accountant.get_epsilon(delta=dp.delta))


def spent(dp: DpSgd, settings: TrainingSettings, shard_size: int, server_round: int) -> tuple[float, float]:
    """(epsilon of this round alone, epsilon of rounds 1..server_round together) for this client."""
    rate, steps = sample_rate(settings, shard_size), round_steps(settings, shard_size)
    return epsilon(dp, rate, steps), epsilon(dp, rate, steps * server_round)
