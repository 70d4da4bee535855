"""Analytic attacks of a malicious server: exact images read off an update, no optimisation.

A malicious server chose the weights (and for the imprint, the architecture) the clients trained, so
the update carries the images: for a linear layer followed by a ReLU, a row that one image alone
switched on has weight gradient g * x and bias gradient g, so x = weight change / bias change.

- Imprint ("Robbing the Fed", Fowl et al. 2022): the rows of each block measure one statistic of the
  image against ascending thresholds, and every row passes the same gradient g_n back for image n.
  Image n switches on every row whose threshold lies below its statistic, so the difference of two
  neighbouring rows holds exactly the images between their thresholds (a bin). A bin with one image
  gives it exactly. Several blocks measure different statistics; a candidate is *confirmed* when
  another block holds exactly the same image with exactly the same g (a mixture does not pass: its
  images fall into different bins there), and a confirmed image is subtracted from every block's bin
  it falls in ("peeling"), which may leave another image alone there.
- Trap weights (Boenisch et al., "When the Curious Abandon Honesty"): rows of the first fully connected
  layer that fire for few inputs; a row fired by one image alone gives it exactly. Many rows catch the
  same lone image: a candidate given by two rows alike is confirmed (a mixture's weights differ per row).

Each victim's `Reconstruction` lists its images in `image_status`: "confirmed", "unconfirmed" (one bin
or row's ratio that nothing else vouches for: it may be a mixture of several images), or "unrecovered"
(a black placeholder: no bin or row was left for it). The attack never sees the truth.

Pure torch; what to read in the update comes from the server's model surgery (fl_sim/server/active.py) as a
`Readout`, which reads an update by its own method: a new analytic attack is a new Readout subclass.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .reconstruction import Reconstruction, Status

CONFIRMED, UNCONFIRMED, UNRECOVERED = "confirmed", "unconfirmed", "unrecovered"
PIXEL_SLACK = 0.02  # a candidate with pixels outside [-slack, 1 + slack] is no image (noise over noise, or a mixture)
MATCH_TOLERANCE = 1e-2  # relative distance under which two candidates are the same image


class Readout(ABC):
    """What the server's surgery tells the analytic attack: where to look in an update and how to read it."""

    image_shape: tuple[int, int, int]

    @abstractmethod
    def read(self, update: dict[str, torch.Tensor], count: int) -> tuple[torch.Tensor, list[str]]:
        """`count` images read off `update` (confirmed first, black placeholders last) and each one's status."""


@dataclass(frozen=True)
class ImprintReadout(Readout):
    """Where the imprint sits in the update and what its rows measure (from the server's surgery)."""

    weight: str  # update key of the imprint rows' weights (rows, C*H*W)
    bias: str  # update key of their biases (rows,)
    rows: torch.Tensor  # (blocks, bins) row indices of each block, thresholds ascending
    directions: torch.Tensor  # (blocks, C*H*W) the statistic s = direction . x each block measures
    thresholds: torch.Tensor  # (blocks, bins) ascending; a row fires when s > its threshold
    image_shape: tuple[int, int, int]

    def read(self, update: dict[str, torch.Tensor], count: int) -> tuple[torch.Tensor, list[str]]:
        return _imprint(self, update, count)


@dataclass(frozen=True)
class MosaicReadout:
    """An imprint whose rows are dealt out to clients (the mosaic attack, fl_sim/server/mosaic.py): `rows[c]`
    holds client c's (blocks, bins) row indices; every client's rows measure the same `directions` against the
    same `thresholds`, and no other client's images reach them, so even a sum of many clients' updates gives
    each client's images by its own rows alone, named by the client."""

    weight: str
    bias: str
    rows: dict[int, torch.Tensor]  # client -> (blocks, bins) its rows, thresholds ascending
    directions: torch.Tensor
    thresholds: torch.Tensor
    image_shape: tuple[int, int, int]
    input_scale: float = 1.0  # the rows saw (x - input_offset) * input_scale: their weight change is g times that
    input_offset: torch.Tensor | None = None

    def read(self, update: dict[str, torch.Tensor], counts: dict[int, int]) -> Reconstruction:
        """Each of `counts`' clients' images (its count of them, confirmed first, placeholders last) read off
        its own rows of `update` (one client's update, or the sum or mean of many), client by client, as one
        Reconstruction whose `image_clients` names the client of each image."""
        # one float64 copy of the rows, not one per client (what _imprint would make of a float32 update)
        rows = torch.cat([self.rows[c].flatten() for c in counts]) if counts else torch.zeros(0, dtype=torch.long)
        weight, bias = update[self.weight].detach(), update[self.bias].detach()
        if weight.ndim != 2 or bias.shape != weight.shape[:1] or (len(rows) and int(rows.max()) >= len(bias)):
            raise ValueError(f"the update's {self.weight} of shape {tuple(weight.shape)} does not hold the rows armed")
        local = {self.weight: weight[rows].double().cpu() / self.input_scale, self.bias: bias[rows].double().cpu()}
        if self.input_offset is not None:  # a row's change g * s (x - o) over s, plus o * g, is g * x
            local[self.weight] += self.input_offset.double().cpu() * local[self.bias][:, None]
        images, status, clients = [], [], []
        start = 0
        for client, count in counts.items():
            size = self.rows[client].numel()
            mine = ImprintReadout(self.weight, self.bias, torch.arange(start, start + size).reshape(
                self.rows[client].shape), self.directions, self.thresholds, self.image_shape)
            found, states = _imprint(mine, local, count)
            images.append(found)
            status += states
            clients += [client] * count
            start += size
        stacked = torch.cat(images) if images else torch.zeros(0, *self.image_shape)
        return Reconstruction(stacked, torch.zeros(len(stacked), dtype=torch.long), float(status.count(UNRECOVERED)),
                              Status.OK, image_status=status, image_clients=clients)


@dataclass(frozen=True)
class TrapReadout(Readout):
    """Where the trapped layer sits in the update and where each pixel arrives at its input."""

    weight: str  # update key of the trapped layer's weights (rows, features)
    bias: str
    pixels: torch.Tensor  # (C*H*W,) the input feature holding each pixel, in image order
    image_shape: tuple[int, int, int]

    def read(self, update: dict[str, torch.Tensor], count: int) -> tuple[torch.Tensor, list[str]]:
        return _trap(self, update, count)


def recover(readout: Readout, updates: list[dict[str, torch.Tensor]], count: int,
            labels: list[torch.Tensor] | None = None) -> list[Reconstruction]:
    """Each update's `count` images (K x B of the round; for a secure aggregate, every client's), with
    per-image status. `labels` (one sorted tensor per update, e.g. recover_labels') are passed through;
    the analytic attack does not pair labels with images. An update the readout cannot read (a key
    missing, a shape that does not fit) gets a BAD_UPDATE row; the other updates are read still."""
    results = []
    for v, update in enumerate(updates):
        try:
            images, status = readout.read(update, count)
            found = labels[v] if labels is not None else torch.zeros(count, dtype=torch.long)
            results.append(Reconstruction(images, found, float(status.count(UNRECOVERED)), Status.OK,
                                          image_status=status))
        except Exception as error:  # a malformed update must not stop the other victims
            results.append(Reconstruction.failure(Status.BAD_UPDATE, f"{type(error).__name__}: {error}"))
    return results


def _plausible(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all() and x.min() >= -PIXEL_SLACK and x.max() <= 1 + PIXEL_SLACK)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).norm() <= MATCH_TOLERANCE * b.norm().clamp_min(1e-30))


def _finish(found: list[torch.Tensor], status: list[str], count: int,
            shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[str]]:
    """At most `count` images (confirmed first); missing ones are black placeholders marked unrecovered."""
    order = sorted(range(len(found)), key=lambda i: status[i] != CONFIRMED)[:count]
    images = [found[i].clamp(0, 1).reshape(shape) for i in order]
    status = [status[i] for i in order]
    while len(images) < count:
        images.append(torch.zeros(shape))
        status.append(UNRECOVERED)
    return torch.stack(images).float().cpu(), status


def _imprint(readout: ImprintReadout, update: dict[str, torch.Tensor], count: int) -> tuple[torch.Tensor, list[str]]:
    weight = update[readout.weight].detach().double().cpu()
    bias = update[readout.bias].detach().double().cpu()
    rows, thresholds = readout.rows.cpu(), readout.thresholds.double().cpu()
    directions = readout.directions.double().cpu()
    # bin j of a block: rows j and j+1 differ by the images whose statistic lies between their thresholds
    cumulative_w, cumulative_b = weight[rows], bias[rows]  # (blocks, bins, D), (blocks, bins)
    bins_w = cumulative_w - torch.cat([cumulative_w[:, 1:], torch.zeros_like(cumulative_w[:, :1])], 1)
    bins_b = cumulative_b - torch.cat([cumulative_b[:, 1:], torch.zeros_like(cumulative_b[:, :1])], 1)
    scale = bins_b.abs().max().clamp_min(1e-300)
    blocks = len(rows)

    def bin_of(x: torch.Tensor) -> torch.Tensor:
        """The bin each block puts image x in (-1: below every threshold, in no bin)."""
        return torch.searchsorted(thresholds, (directions @ x)[:, None]).flatten() - 1

    def peel(x: torch.Tensor, g: torch.Tensor) -> None:
        for b, j in enumerate(bin_of(x).tolist()):
            if j >= 0:
                bins_w[b, j] -= g * x
                bins_b[b, j] -= g

    def vouched(x: torch.Tensor, g: torch.Tensor, source: int) -> bool:
        """Another block's bin for x holds exactly g * x (so x is one image, not a mixture: a mixture's
        images fall into different bins there)."""
        for b, j in enumerate(bin_of(x).tolist()):
            if b != source and j >= 0 and abs(float(bins_b[b, j] - g)) <= MATCH_TOLERANCE * abs(float(g)) \
                    and _same(bins_w[b, j], g * x):
                return True
        return False

    confirmed: list[torch.Tensor] = []
    floor = 1e-3 * scale  # bias changes under this are rounding left by peeling, not images
    progress = blocks > 1
    while progress and len(confirmed) < count:
        progress = False
        for b in range(blocks):
            for j in (bins_b[b].abs() > floor).nonzero().flatten().tolist():
                g = bins_b[b, j].clone()
                if abs(float(g)) <= floor:  # peeled meanwhile
                    continue
                x = bins_w[b, j] / g
                if _plausible(x) and vouched(x, g, b):
                    confirmed.append(x)
                    peel(x, g)
                    progress = True
    # what is left: one bin's ratio, nothing vouching for it (with one block, every bin is like this)
    candidates: list[torch.Tensor] = []
    for b in range(blocks):
        for j in (bins_b[b].abs() > floor).nonzero().flatten().tolist():
            x = bins_w[b, j] / bins_b[b, j]
            if _plausible(x) and not any(_same(x, y) for y in candidates + confirmed):
                candidates.append(x)
    found = confirmed + candidates
    status = [CONFIRMED] * len(confirmed) + [UNCONFIRMED] * len(candidates)
    return _finish(found, status, count, readout.image_shape)


def _trap(readout: TrapReadout, update: dict[str, torch.Tensor], count: int) -> tuple[torch.Tensor, list[str]]:
    weight = update[readout.weight].detach().double().cpu()
    bias = update[readout.bias].detach().double().cpu()
    pixels = readout.pixels.cpu()
    fired = (bias.abs() > 1e-6 * bias.abs().max().clamp_min(1e-300)).nonzero().flatten()
    # strongest rows first: the least rounding error in their ratio
    fired = fired[bias[fired].abs().argsort(descending=True)]
    groups: list[list[torch.Tensor]] = []
    for row in fired.tolist():
        x = weight[row, pixels] / bias[row]
        if not _plausible(x):
            continue
        for group in groups:
            if _same(x, group[0]):
                group.append(x)
                break
        else:
            groups.append([x])
    found = [group[0] for group in groups]
    status = [CONFIRMED if len(group) > 1 else UNCONFIRMED for group in groups]
    return _finish(found, status, count, readout.image_shape)
