"""The mosaic attack: per-client imprint rows, so that even secure aggregation's sum gives every client's images.

Secure aggregation hides each client's update in the sum, but the server chooses what each client is sent
(Pasquini et al., CCS 2022: different models to different clients undo the aggregation; LOKI, Zhao et al.
S&P 2024, and MANDRAKE, CVPR 2023, do it with per-client convolution kernels or sparse per-client
parameters). Here the clients build the imprint block (fl_sim/learning/models/imprint.py) as for the imprint
attack, and the server deals its rows out: client k of the round gets a slice of rows that measure the
image exactly as the imprint attack's do (fl_sim/server/active.py: principal directions, quantile
thresholds, several blocks), while every other row is switched off for it by a bias far below anything an
image reaches (`DEAD_BIAS`): a row that never fires gets no gradient, so in the sum of all updates client
k's slice changed by client k's images alone. Reading each slice with the imprint readout gives each
client's images apart, named by the client (`Reconstruction.image_clients`).

Only the rows' biases differ between clients: everything else a client is sent is one shared set of
tensors, so the per-client arming costs a bias vector per client, not a model (`Armed.weights` maps each
client to a dict that shares the other tensors).

Secure aggregation quantizes what it sums (Flower's SecAgg+ clips every parameter to +-8 and rounds it
stochastically to 2^22 levels): with one local step the rows are read before they move, so the server may
make each image's bias change large (`BIAS_CHANGE`), far above the quantization step, and every sent value
stays within the clipping range. With several steps the rows move with every image they see, and the
change one image makes must stay a small share of a bin (the imprint attack's rule), which makes it small.

Through Flower's real SecAgg+ the server knows the protocol's settings (its own ServerApp sets them) and arms
for them (`protocol`): every tensor it sends lies on the quantization grid, so the entries a client leaves
unchanged (all of every other client's rows) quantize with no rounding at all and only a client's own changed
rows carry its rounding; the switched-off rows' biases may lie beyond the clipping range (the server reads
the update against the clipped weights, `revealed_update`); and with several steps the rows are as steep as
`STEEP_OVER_RANGE` x the clipping range allows (the outermost rows' biases may be clipped: those bins are lost,
the others gain).

Several steps (FedAvg) also change how the rows are driven. A row that image x switches on with gradient g moves
a later image x' by g (x . x' + 1), and x . x' is large for any two natural images (~700 on CIFAR-10), so the
drift rule kept g, and with it what the rows read, near SecAgg+'s quantization step. The rows instead see the
image less the public mean, scaled by a power of two (`centre`: the drift is then g (s^2 (x - o).(x' - o) + 1),
about 2g), and their gradient comes through the block's shortcut to the logits, not through the base model's
input: the shortcut adds a - a.detach() of the rows' activations a, nothing in value (the base model sees and
trains on the image alone), while each row gets its image's gradient (models/imprint.py).

What a client receives is nearly all the rows' weights (rows x pixels), the same for every client: they travel as
float16 (`Armed.narrow`), rounded by the server to values float16 holds and, armed for SecAgg+, to its grid, so the
clients load exactly what the server reads against (`in_half`). They are also a few distinct rows repeated (every
bin of a block points the same way, every client's slice is the same): to fl-sim's ClientApp they travel as those
rows and each row's index (`Armed.distinct_rows`, fl_sim/learning/transport.py), a transport encoding the ClientApp
expands before anything reads the model (clients/transport.py), so what a client trains, inspects and sends back
is the full block.

How many rows the block has is the run config's (`RunConfig.imprint_rows`: `--imprint-bins`, or without it the
rows the round needs, `MOSAIC_ROWS` in fl_sim/contract/attacks.py), so the clients build the block the server arms.
In epochs mode the server knows a client's shard only from its reply: it arms for one step only when the largest
shard a client may hold (`--max-shard`) fits one batch.
"""
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import torch
from torch import nn

from attacker import Reconstruction
from attacker.analytic import UNRECOVERED, MosaicReadout
from fl_sim.contract.attacks import MOSAIC_ROWS
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.learning.models.imprint import Imprinted
from fl_sim.learning.updates import Weights
from fl_sim.server.active import (
    ALPHA,
    DRIFT_SHARE,
    SERVER_OWNED,
    Imprint,
    global_base,
    image_shape,
    imprint_layout,
    input_gradient,
)
from fl_sim.server.attacks import Armed, Attack, AttackContext, Observed, SettingValue
from fl_sim.server.secagg import SecAggParameters

DEAD_BIAS = -1.0  # a switched-off row's bias: far below any image's activation, well inside SecAgg+'s +-8 range
BIAS_CHANGE = 1e-2  # one step: the median image's change of its rows' biases (the quantization step is ~4e-6)
STEEP_REACH = 3.0  # several steps: the rows' largest threshold x alpha, their bias (SecAgg+ clips at 8)
STEEP_OVER_RANGE = 2.0  # several steps through SecAgg+: the rows' largest bias over the clipping range (measured
# on CIFAR-10, 10 clients, 4 steps of 4: 1 -> 46%, 2 -> 51%, 3 -> 43% at >= 30 dB)
IMPRINT_WEIGHT, IMPRINT_BIAS, SPREAD = "imprint.weight", "imprint.bias", "spread.weight"
CENTRE_SCALE, CENTRE_OFFSET = "centre.scale", "centre.offset"
SHORTCUT, SIGNS = "shortcut.weight", "shortcut.signs"


@dataclass(frozen=True)
class MosaicArmed(Armed):
    """The round's arming: each client's weights (sharing all but the rows' biases) and where its rows are."""

    mosaic: MosaicReadout | None = None


class MosaicAttack(Attack):
    name = "mosaic"

    def __init__(self, model: nn.Module, public: torch.Tensor, blocks: int, drift_share: float = DRIFT_SHARE,
                 bias_change: float = BIAS_CHANGE, protocol: SecAggParameters | None = None,
                 client_images: int | None = None):
        if not isinstance(model, Imprinted):
            raise ValueError("the mosaic attack needs the imprint block in the clients' model (imprint-bins)")
        self.model, self.public, self.blocks = model, public.float(), blocks
        self.drift_share, self.bias_change, self.protocol = drift_share, bias_change, protocol
        self.client_images = client_images  # epochs mode: the most a client holds (one step if within a batch)
        self.rows = model.imprint.out_features
        flat = self.public.flatten(1).double()
        mean = flat.mean(0)
        self.mean = mean.float()  # several steps: the rows see the image less the public mean, scaled
        centred = flat - mean
        self.centred_energy = float((centred ** 2).sum(1).mean())  # mean |x - o|^2: the most one image moves rows
        # the scale s, a power of two (on SecAgg+'s grid), with s^2 (x - o).(x' - o) near 1 for two images
        cross = centred[:256] @ centred[:256].T
        typical = float(cross[~torch.eye(len(cross), dtype=torch.bool)].abs().mean()) if len(cross) > 1 else 1.0
        self.scale = 2.0 ** -round(math.log2(max(typical, 1.0)) / 2)
        self._layouts: dict[int, tuple[Imprint, float]] = {}  # by bins per block: the same every round

    @classmethod
    def build(cls, context: AttackContext) -> Self:
        config = context.config
        protocol = SecAggParameters.of(config) if config.defense.protocol else None
        return cls(context.model, context.public(), config.imprint_blocks, protocol=protocol,
                   client_images=config.client_images)

    def resolved(self) -> dict[str, SettingValue]:
        return {"imprint_blocks": self.blocks}

    def layout(self, clients: int) -> tuple[Imprint, float]:
        """One client's slice (rows 0 ..) when `clients` share the rows, and a typical bin's width."""
        bins = self.rows // (clients * self.blocks)
        if bins < MOSAIC_ROWS.least_bins:
            least = MOSAIC_ROWS.least(clients, self.blocks)
            raise ValueError(f"mosaic: {self.rows} imprint rows cannot give {clients} clients {self.blocks} blocks of "
                             f"{MOSAIC_ROWS.least_bins} or more bins each: raise --imprint-bins to at least {least}")
        if bins not in self._layouts:
            self._layouts[bins] = imprint_layout(self.public, self.blocks, bins)
        return self._layouts[bins]

    def arm(self, global_weights: Weights, settings: TrainingSettings, targets: Sequence[int]) -> MosaicArmed:
        """Every target gets the shared armed block with only its own slice of rows switched on."""
        targets = sorted(targets)
        one_step = settings.single_step(self.client_images)
        layout, gap = self.layout(len(targets))
        live = layout.rows.numel()  # one client's rows
        features = self.public[0].numel()
        reach = float(layout.thresholds.abs().max())  # the largest statistic a row compares with
        shared = dict(global_weights)  # the base model's tensors, shared, not copied
        if one_step:  # nothing moves the rows before they are read: one image's bias change may be large; the
            # gradient comes through the base model's input (a brightness shift), the rows see x itself
            alpha, scale, offset = ALPHA, 1.0, torch.zeros(features)
            brightness = self._brightness()
            per_image = settings.lr * self._input_gradient(global_weights, settings) @ brightness
            shared[SPREAD] = self.bias_change / float(per_image.abs().median().clamp_min(1e-12)) * brightness
            shared[SHORTCUT] = torch.zeros_like(global_weights[SHORTCUT])
        else:  # one image's change g of its rows moves a later image's activation by g (s^2 (x-o).(x'-o) + 1),
            # which must stay drift_share of a bin (alpha * gap): the rows are as steep as the clipping range
            # allows, see the centred image scaled (`self.scale`), and take the largest change that keeps to that;
            # the gradient comes through the shortcut to the logits, which adds nothing to them (models/imprint.py)
            steep = STEEP_REACH if self.protocol is None else STEEP_OVER_RANGE * self.protocol.clipping_range
            alpha, scale, offset = steep / reach, self.scale, self.mean
            if self.protocol is not None:
                offset = self.protocol.on_grid(offset)
            change = self.drift_share * gap * alpha / (scale * scale * self.centred_energy + 1)
            shared[SPREAD] = torch.zeros(features)
            pattern = self._pattern(global_weights[SHORTCUT].numel())
            gradient = self._logit_gradient(global_weights, settings, pattern)
            shared[SHORTCUT] = change / (settings.lr * gradient) * pattern
        weight = torch.zeros(self.rows, features)
        one = layout.directions.repeat_interleave(layout.rows.shape[1], 0) * (alpha / scale)  # (slice rows, features)
        weight[: live * len(targets)] = one.repeat(len(targets), 1)
        shared[IMPRINT_WEIGHT] = weight
        shared[CENTRE_SCALE] = torch.full((1,), scale)
        shared[CENTRE_OFFSET] = offset
        shared[SIGNS] = torch.ones(self.rows)
        # a row fires when its statistic d . x passes its threshold: d . (x - o) + d . o > threshold
        own = (-(layout.thresholds - (layout.directions @ offset)[:, None]) * alpha).flatten()
        if self.protocol is not None:  # a row whose bias the client's quantization would clip is set at the edge
            # instead: it then merges with its neighbour (an empty bin) rather than read a change that was cut off
            own = self.protocol.clipped(own)
        dead = -max(-DEAD_BIAS, 2.5 * alpha * reach)  # below every activation, inside SecAgg+'s range
        rows: dict[int, torch.Tensor] = {}
        sent: dict[int, Weights] = {}
        if self.protocol is not None:  # on SecAgg+'s grid: what no client changes quantizes exactly (module doc)
            # (not the fixed spread and shortcut vectors: nobody trains them, the server never reads them, and
            # their entries may be smaller than a level)
            shared = {name: tensor if name in (SPREAD, SHORTCUT) else self.protocol.on_grid(tensor)
                      for name, tensor in shared.items()}
        narrow = {}  # the rows' weights (nearly all the block) travel as float16 where it holds them exactly
        halved = in_half(shared[IMPRINT_WEIGHT], self.protocol)
        if halved is not None:
            shared[IMPRINT_WEIGHT], narrow[IMPRINT_WEIGHT] = halved, torch.float16
        for slot, client in enumerate(targets):
            bias = torch.full((self.rows,), dead)
            bias[slot * live:(slot + 1) * live] = own
            rows[client] = layout.rows + slot * live
            sent[client] = {**shared, IMPRINT_BIAS: bias if self.protocol is None else self.protocol.on_grid(bias)}
        readout = MosaicReadout(IMPRINT_WEIGHT, IMPRINT_BIAS, rows, layout.directions, layout.thresholds,
                                image_shape(self.public), scale,
                                None if one_step else shared[CENTRE_OFFSET])
        return MosaicArmed(sent, None, narrow, frozenset({IMPRINT_WEIGHT}), mosaic=readout)

    def _brightness(self) -> torch.Tensor:
        features = self.public[0].numel()
        return torch.full((features,), features ** -0.5)

    @staticmethod
    def _pattern(classes: int) -> torch.Tensor:
        """The shortcut's direction over the logits: +1, -1, +1, ... (unit length). An untrained model's
        p . pattern is near 0, so every label's gradient (p - y) . pattern has about the same size."""
        return torch.tensor([(-1.0) ** k for k in range(classes)]) / classes ** 0.5

    def _logit_gradient(self, global_weights: Weights, settings: TrainingSettings, pattern: torch.Tensor) -> float:
        """The median over public images of |(p - y) . pattern|, the label y drawn from the base model's own
        p: how large a gradient the shortcut along `pattern` hands the rows, per unit of its weight."""
        base = global_base(self.model, global_weights)
        images = self.public[: max(64, settings.batch_size)]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            p = torch.cat([base(chunk).softmax(1) for chunk in images.split(max(2, settings.batch_size))])
        along = p @ pattern
        per_image = (p * (along[:, None] - pattern[None, :]).abs()).sum(1)
        return float(per_image.median().clamp_min(1e-12))

    def _input_gradient(self, global_weights: Weights, settings: TrainingSettings) -> torch.Tensor:
        return input_gradient(self.model, self.public, global_weights, settings)

    def read(self, observed: Sequence[Observed], armed: Armed | None, seed: int) -> list[Reconstruction]:
        """Each observed update (one client's, or a secure aggregate of many) read slice by slice; a client of a
        secure aggregate that was not armed gets black placeholders, marked unrecovered."""
        if not isinstance(armed, MosaicArmed) or armed.mosaic is None:
            raise ValueError("mosaic reads only updates of the weights it armed")
        results = []
        for each in observed:
            clients = each.victim.clients
            count = each.settings.num_images // len(clients)  # a secure aggregate's settings hold all its images
            counts = {client: count for client in clients}
            results.append(read_clients(armed.mosaic, each.update, counts))
        return results

    def aggregated(self, reply: Weights, sent: Weights, global_weights: Weights) -> Weights:
        """The victim's base model as it trained it; the imprint block as the global model has it."""
        return {name: global_weights[name] if name.startswith(SERVER_OWNED) else tensor
                for name, tensor in reply.items()}


def in_half(tensor: torch.Tensor, protocol: SecAggParameters | None) -> torch.Tensor | None:
    """`tensor` rounded to values float16 holds (then to SecAgg+'s grid, when armed for it), kept in its dtype; None
    when the grid's values are not all float16's (a clipping range or level count that is no power of two).

    Parameters
    ----------
    tensor : torch.Tensor
        What the server would send in float32.
    protocol : SecAggParameters or None
        SecAgg+'s settings when the server arms for them.

    Returns
    -------
    torch.Tensor or None
        The rounded tensor, whose values the clients load from float16 exactly, or None.
    """
    rounded = tensor.half().to(tensor.dtype)
    if protocol is not None:
        rounded = protocol.on_grid(rounded)
    return rounded if torch.equal(rounded.half().to(tensor.dtype), rounded) else None


def read_clients(readout: MosaicReadout, update: Mapping[str, torch.Tensor],
                 counts: Mapping[int, int]) -> Reconstruction:
    """`readout.read` for the armed clients among `counts`, with placeholders for the others, in `counts`' order."""
    armed = {client: count for client, count in counts.items() if client in readout.rows}
    found = readout.read(dict(update), armed)
    images, status, clients = [], [], []
    offset = {}
    start = 0
    for client, count in armed.items():
        offset[client] = start
        start += count
    for client, count in counts.items():
        if client in offset:
            images.append(found.images[offset[client]:offset[client] + count])
            status += (found.image_status or [])[offset[client]:offset[client] + count]
        else:
            images.append(torch.zeros(count, *readout.image_shape))
            status += [UNRECOVERED] * count
        clients += [client] * count
    stacked = torch.cat(images) if images else torch.zeros(0, *readout.image_shape)
    return Reconstruction(stacked, torch.zeros(len(stacked), dtype=torch.long), float(status.count(UNRECOVERED)),
                          image_status=status, image_clients=clients)
