"""What a client of the mosaic receives and sends, against the honest model: parameters and bytes, no training.

For each case (clients x images a client, one step or several) it sizes the imprint block as `fl-sim run` does
without `--imprint-bins` (`RunConfig.imprint_rows`), builds the clients' model, arms it for the round
(`MosaicAttack.arm`, with the server's public images) and counts, for one client's armed state dict: its entries
(every tensor the client is sent: parameters and the fixed buffers), those that are not zero, and the bytes of the
Flower `ArrayRecord` that carries it (its `Array.data` bytes: float32 arrays, the rows' weights float16 where the
attack sends them so, `Armed.narrow`). A reply has the same shape in the model's float32: those bytes without secure
aggregation, and one int64 a summed entry through Flower's SecAgg+ (its masked vector). "Compressed": the received
bytes through zlib at level 1, array by array (what a transport that compresses would carry; Flower 1.41 sets no
gRPC compression). "Distinct rows": the received bytes as fl-sim's server sends them to its own ClientApp, the rows'
weights as their distinct rows and each row's index (`Armed.distinct_rows`, fl_sim/learning/transport.py, a
transport encoding the ClientApp expands before it reads the model). "Added" is the armed model less the honest one
(the same base model, no imprint block), the way the linear-layer leakage papers count a model's size overhead;
"non-zero added" counts only the entries not zero.

    python benchmarks/mosaic_overhead.py [--cases cifar10:cnn:10:16:1 ...] [--data-root DIR] [--json FILE]

A case is DATASET:MODEL:CLIENTS:IMAGES:STEPS (IMAGES a client a round, in STEPS local steps of IMAGES / STEPS).
"""
import json
import zlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import torch
from flwr.app import Array, ArrayRecord

from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.transport import packed_smaller
from fl_sim.learning.updates import Weights, weights
from fl_sim.server.active import public_images
from fl_sim.server.mosaic import MosaicAttack

CASES = ("cifar10:cnn:10:16:1", "cifar10:cnn:100:16:1", "cifar10:cnn:100:16:4", "mnist:cnn:1000:8:1")
HONEST = ("cifar10:cnn", "mnist:cnn", "mnist:lenet")


@dataclass(frozen=True)
class Count:
    """One state dict a client is sent: its entries, those not zero, the ArrayRecord's bytes, those bytes
    compressed (zlib level 1, array by array) and with the distinct-rows encoding."""

    entries: int
    nonzero: int
    record_bytes: int
    compressed_bytes: int
    distinct_bytes: int


def count(state: Weights, narrow: Mapping[str, torch.dtype] = {}, distinct_rows: Collection[str] = ()) -> Count:
    """The entries, non-zero entries and Flower ArrayRecord bytes of a state dict a client is sent.

    Parameters
    ----------
    state : Weights
        Name -> tensor, as the server holds it.
    narrow : Mapping[str, torch.dtype]
        The tensors it sends in a narrower dtype (`Armed.narrow`).
    distinct_rows : Collection[str]
        The tensors it sends as their distinct rows where that is smaller (`Armed.distinct_rows`).

    Returns
    -------
    Count
        Its figures.
    """
    record = ArrayRecord({name: tensor.detach().cpu().to(narrow.get(name, tensor.dtype)).contiguous()
                          for name, tensor in state.items()})
    packed = {name: packed_smaller(record[name].numpy()) for name in distinct_rows}
    encoded = ArrayRecord()
    for name, array in record.items():
        smaller = packed.get(name)
        encoded[name] = Array(smaller) if smaller is not None else array
    return Count(entries=sum(t.numel() for t in state.values()),
                 nonzero=sum(int(torch.count_nonzero(t)) for t in state.values()),
                 record_bytes=sum(len(array.data) for array in record.values()),
                 compressed_bytes=sum(len(zlib.compress(array.data, 1)) for array in record.values()),
                 distinct_bytes=sum(len(array.data) for array in encoded.values()))


def honest(dataset: str, model: str, data_root: str) -> Count:
    """The honest model of `dataset` (its global weights as built for round 1)."""
    (channels, size, _), classes = image_spec(cached_dataset(dataset, data_root, False))
    return count(weights(build_model(model, channels, size, classes, seed=0)))


def mosaic(case: str, data_root: str, seed: int) -> dict[str, Any]:
    """One case's figures: the sized block, what client 0 is sent (every client is sent as much), the overhead."""
    dataset, model_name, clients, images, steps = case.split(":")
    n, k, b = int(clients), int(steps), int(images) // int(steps)
    config = RunConfig.from_values({"attack": "mosaic", "dataset": dataset, "data_root": data_root, "model": model_name,
                                    "num_clients": n, "train_mode": "steps", "local_steps": k, "batch_size": b,
                                    "seed": seed})
    config.check()
    test = cached_dataset(dataset, data_root, False)
    (channels, size, _), classes = image_spec(test)
    model = build_model(model_name, channels, size, classes, seed=seed, imprint=config.imprint_rows)
    attack = MosaicAttack(model, public_images(test, seed=seed), config.imprint_blocks,
                          client_images=config.client_images)
    armed = attack.arm(weights(model), config.training, list(range(n)))
    sent = count(armed.weights[0], armed.narrow, armed.distinct_rows)
    reply = count(armed.weights[0])  # the reply is all float32
    base = honest(dataset, model_name, data_root)
    del armed, attack, model
    return {"case": case, "dataset": dataset, "model": model_name, "clients": n, "images": int(images),
            "local_steps": k, "rows": config.imprint_rows, "rows_per_image": config.imprint_rows / (n * int(images)),
            "entries": sent.entries, "nonzero": sent.nonzero, "received_bytes": sent.record_bytes,
            "compressed_bytes": sent.compressed_bytes, "honest_compressed_bytes": base.compressed_bytes,
            "distinct_bytes": sent.distinct_bytes, "distinct_times_honest": sent.distinct_bytes / base.record_bytes,
            "added": sent.entries - base.entries, "nonzero_added": sent.nonzero - base.nonzero,
            "times_honest": sent.record_bytes / base.record_bytes,
            "reply_float32_bytes": reply.record_bytes, "reply_secagg_bytes": 8 * sent.entries}


def training_text(figures: dict) -> str:
    steps = int(figures["local_steps"])
    return "FedSGD" if steps == 1 else f"FedAvg, {steps} steps of {int(figures['images']) // steps}"


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="DATASET:MODEL:CLIENTS:IMAGES:STEPS")
    common.add_data_root(parser)
    common.add_seed(parser)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model a client receives | rows (an image) | entries | non-zero | added over honest | non-zero added "
          "| received (ArrayRecord) | x honest | compressed | distinct rows | x honest | "
          "reply: float32 / SecAgg+ int64 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows: list[dict] = []
    for pair in HONEST:
        dataset, model_name = pair.split(":")
        base = honest(dataset, model_name, args.data_root)
        rows.append({"case": pair, "entries": base.entries, "nonzero": base.nonzero,
                     "received_bytes": base.record_bytes, "compressed_bytes": base.compressed_bytes,
                     "distinct_bytes": base.distinct_bytes})
        megabytes = base.record_bytes / 1e6
        print(f"| honest {model_name} ({dataset}) | | {base.entries:,} | {base.nonzero:,} | | | "
              f"{megabytes:.2f} MB | 1 | {base.compressed_bytes / 1e6:.2f} MB | {megabytes:.2f} MB | 1 | "
              f"{megabytes:.2f} / {8 * base.entries / 1e6:.2f} MB |")
    for case in args.cases:
        figures = mosaic(case, args.data_root, args.seed)
        rows.append(figures)
        print(f"| mosaic {figures['clients']} x {figures['images']} {figures['dataset']} {figures['model']}, "
              f"{training_text(figures)} | {figures['rows']:,} ({figures['rows_per_image']:g}) | "
              f"{figures['entries']:,} | {figures['nonzero']:,} | {figures['added']:,} | "
              f"{figures['nonzero_added']:,} | "
              f"{figures['received_bytes'] / 1e6:,.1f} MB | {figures['times_honest']:,.0f} | "
              f"{figures['compressed_bytes'] / 1e6:,.1f} MB | {figures['distinct_bytes'] / 1e6:,.2f} MB | "
              f"{figures['distinct_times_honest']:,.2f} | "
              f"{figures['reply_float32_bytes'] / 1e6:,.1f} / {figures['reply_secagg_bytes'] / 1e6:,.1f} MB |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
