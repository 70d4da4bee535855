"""The malicious server at scale: one `fl-sim run` per client count, measured from outside.

For each count N it runs `fl-sim run` (a fresh process, under /usr/bin/time -v) with N clients sampled a round
(out of a population of `--population` when given: `--fraction-train` = N / population), FedSGD or FedAvg as
asked, the attack asked (mosaic: `--imprint-bins` = rows-per-image x N x images a client when `--rows-per-image`
is given; without it the run sizes the block itself, 4 rows an image with one step and 6 with several) and, by default,
`--defense secagg-emulated` (the server averages the replies; `--defense secagg` runs Flower's SecAgg+).
Each run's log (the server's, with the time each SecAgg+ stage began) is written to OUT.log as the run goes (`tail
-f` it to follow a long run) and kept as OUT/run.log. It prints one line
per run: clients, images a round, the share of them recovered at
>= 30 and >= 40 dB, the run's seconds, its peak resident memory (the "Maximum resident set size" of
/usr/bin/time: the largest single process, the server's), the peak memory of all the processes the run starts
together (the server, Ray's GCS, raylet and workers, sampled every 2 seconds from /proc/PID/status: every process's
anonymous memory summed, plus the largest shared part of any one of them, its files and shared memory, once, so Ray's
object store and the libraries every process maps count once) and the size of one round's replies
(sampled clients x the model's bytes, what the server must at least hold). With several rounds and a
population it also prints the cumulative share of the population's images recovered at >= 30 dB (an image
counts once, whichever round it was read in).

    python benchmarks/scale.py --clients 10 100 [--attack mosaic] [--dataset cifar10] [--model cnn]
        [--images 16] [--local-steps 1] [--rows-per-image 0] [--rounds 1] [--population 1000]
        [--defense secagg-emulated|secagg|none] [--data-root DIR] [--out DIR] [--json FILE] [fl-sim run flags]

Flags it does not know go to every `fl-sim run` as they are: the server's SecAgg+ settings, for one
(`--secagg-max-weight 16 --secagg-quantization-range 42949672`). Under `--defense secagg` a reply is the
masked vector SecAgg+ sends, one int64 per parameter: "replies GB" counts that.

Runs of ~3 GB peak or more belong under the machine's big-run lock: `flock /work/bigrun.lock python ...`.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import common
import numpy as np

from fl_sim.commands import guard
from fl_sim.contract.defenses import DefenseSpec
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.partition import client_shards, training_examples
from fl_sim.results.outputs import read_jsonl


class TreeMemory:
    """The peak memory of a process and all its descendants together, sampled every `every` seconds on a thread:
    their anonymous memory summed (RssAnon), plus the largest shared part (RssFile + RssShmem) of any one of them
    once. /proc/PID/status is cheap to read where the exact proportional set size (smaps_rollup) walks every page
    table and took a quarter of a core at 1000 clients."""

    def __init__(self, root: int, every: float = 2.0):
        self.root, self.every, self.peak = root, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stops sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak

    def _sample(self) -> None:
        while not self._stop.is_set():
            held = [resident(pid) for pid in descendants(self.root)]
            self.peak = max(self.peak, sum(own for own, _ in held) + max((shared for _, shared in held), default=0))
            self._stop.wait(self.every)


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from each process's parent in /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def resident(pid: int) -> tuple[int, int]:
    """A process's resident anonymous memory and its resident shared part (files and shared memory), in bytes
    (zeros once it is gone)."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields.get("RssAnon", 0), fields.get("RssFile", 0) + fields.get("RssShmem", 0)


def run_one(args: argparse.Namespace, clients: int, out: Path,
            extra: Sequence[str] = ()) -> dict[str, float | int | str | None]:
    """One `fl-sim run` of `clients` sampled clients; its figures."""
    images = args.images
    population = args.population or clients
    batch = images // args.local_steps
    rows = (args.rows_per_image * clients * images if args.attack == "mosaic" else args.imprint_bins) or None
    command = [str(Path(sys.executable).parent / "fl-sim"), "run", "--dataset", args.dataset, "--data-root",
               args.data_root, "--model", args.model, "--num-clients", str(population),
               "--fraction-train", str(clients / population), "--rounds", str(args.rounds), "--train-mode", "steps",
               "--local-steps", str(args.local_steps), "--batch-size", str(batch), "--attack", args.attack,
               *(["--imprint-bins", str(rows)] if rows else []), "--defense", args.defense, "--seed", "0",
               "--out", str(out),
               "--max-attack-images", str(images if args.attack == "mosaic" else clients * images), *extra]
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    # the server's log as it runs (when each SecAgg+ stage began), then /usr/bin/time's figures; beside OUT while
    # the run goes (fl-sim run writes only into a new folder), moved into it after
    log = out.with_name(out.name + ".log")
    with log.open("w") as sink:
        process = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=sink, stderr=subprocess.STDOUT)
        memory = TreeMemory(process.pid)
        returncode = process.wait()
    seconds = time.perf_counter() - started
    total = memory.stop()
    text = log.read_text(errors="replace")
    if out.is_dir():
        log = log.rename(out / "run.log")
    if returncode:
        raise SystemExit(f"fl-sim run failed ({returncode}); the end of {log}:\n{text[-3000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if found is None:
        raise SystemExit("/usr/bin/time -v printed no peak memory (is GNU time installed?)")
    peak = int(found.group(1)) * 1024
    shape, classes = image_spec(cached_dataset(args.dataset, args.data_root, False))
    built = json.loads((out / "run.json").read_text()).get("imprint_rows", 0)  # the block the clients built
    reply = guard.model_bytes(args.model, shape, classes, built)
    if DefenseSpec.parse(args.defense).protocol:  # SecAgg+ sends each parameter as a masked int64: twice float32's
        reply *= 2
    rows_read = read_jsonl(out / "metrics.jsonl")
    # each row's per-image PSNRs (a row without them, e.g. a failed read: every image unrecovered)
    row_psnr = [np.asarray(row.get("psnr_images") or [0.0] * len(row.get("true_labels", []))) for row in rows_read]
    psnr = np.concatenate(row_psnr) if row_psnr else np.zeros(0)
    figures: dict[str, float | int | str | None] = {
        "attack": args.attack, "clients": clients, "population": population, "rounds": args.rounds,
        "images": int(len(psnr)), "share_30db": float(np.mean(psnr >= 30)) if len(psnr) else None,
        "share_40db": float(np.mean(psnr >= 40)) if len(psnr) else None, "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak / 1e9, 2), "peak_total_gb": round(total / 1e9, 2),
        "replies_gb": round(clients * reply / 1e9, 2), "defense": args.defense,
        "local_steps": args.local_steps, "dataset": args.dataset}
    by_round: dict[int, list[np.ndarray]] = {}
    for row, values in zip(rows_read, row_psnr, strict=True):
        by_round.setdefault(int(row["round"]), []).append(values)
    pooled = [np.concatenate(values) for values in by_round.values()]
    figures["worst_round_40db"] = min((float(np.mean(values >= 40)) for values in pooled if len(values)), default=None)
    if args.population:
        figures["cumulative_share_30db"] = cumulative_share(out, rows_read)
    return figures


PANELS = (("share_40db", "share of the round's images at >= 40 dB"), ("seconds", "seconds the run took"),
          ("peak_total_gb", "peak memory, all processes (GB)"), ("replies_gb", "replies of the round (GB)"))


def plot(files: list[str], path: str) -> None:
    """Share at >= 40 dB, seconds, peak memory of all the run's processes and the round's replies against the
    clients of a round, one line per attack, data set, defense, images a client and local steps, from the --json
    files of earlier runs (a figure a run lacks, e.g. the all-process peak of a run measured before it was
    sampled, leaves its point out of that panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict]] = {}
    for file in files:
        for figures in json.loads(Path(file).read_text()):
            per_client = figures["images"] // figures["clients"] // figures["rounds"]
            steps = figures.get("local_steps", 1)
            label = (f"{figures['attack']} ({figures.get('dataset', 'cifar10')}, {figures.get('defense', '?')}, "
                     f"{per_client} images a client, {f'{steps} steps' if steps > 1 else 'FedSGD'})")
            lines.setdefault(label, []).append(figures)
    figure, grid = plt.subplots(2, 2, figsize=(11, 7.5))
    for axes, (key, title) in zip(grid.flat, PANELS, strict=True):
        for label, runs in sorted(lines.items()):
            points = sorted((int(run["clients"]), float(run[key])) for run in runs if run.get(key) is not None)
            if points:
                axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axes.set_xscale("log")
        if key == "share_40db":
            axes.set_ylim(0, 1)
        else:
            axes.set_yscale("log")
        axes.set_xlabel("clients in the round (all through the secure aggregate)")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
    grid.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cumulative_share(out: Path, rows: list[dict]) -> float:
    """The share of the population's images recovered at >= 30 dB in some round (each image once): the rows'
    per-image PSNRs (in the truth's order) mapped back to the examples each client-round trained on, which the
    run's config (OUT/run.json) re-derives as its scoreboard does."""
    config = json.loads((out / "run.json").read_text())["config"]
    train = cached_dataset(config["dataset"], config["data-root"], True)
    shards = client_shards(train.labels, config["num-clients"], config["partition"], config["alpha"], config["seed"],
                           config["min-shard"], config["max-shard"])
    settings = TrainingSettings(lr=config["lr"], local_steps=config["local-steps"], batch_size=config["batch-size"])
    found: set[int] = set()
    for row in rows:
        if row.get("psnr_images") is None or not isinstance(row.get("client"), int):
            continue
        examples = training_examples(shards[row["client"]], settings, config["seed"], row["client"], row["round"])
        found.update(int(examples[i]) for i, value in enumerate(row["psnr_images"]) if value >= 30)
    return len(found) / sum(len(shard) for shard in shards)


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--attack", default="mosaic")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--images", type=int, default=16, help="images a client trains on a round")
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--rows-per-image", type=int, default=0,
                        help="mosaic: --imprint-bins = this x clients x images (0, default: the run sizes the block)")
    parser.add_argument("--imprint-bins", type=int, default=2048, help="the imprint attack's rows")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--population", type=int, default=0, help="clients in all (0: every client, every round)")
    parser.add_argument("--defense", default="secagg-emulated")
    common.add_data_root(parser)
    common.add_out(parser, "out/scale", "the runs' folders")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--plot", nargs="+", metavar="JSON",
                        help="run nothing: draw share, seconds, memory and replies against clients of these --json "
                        "files into --out (a .png)")
    args, extra = parser.parse_known_args()  # any other flag goes to `fl-sim run` as it is (--secagg-max-weight 16)
    if args.plot:
        plot(args.plot, args.out)
        return
    print("attack  clients  images  >=30dB  >=40dB  worst round >=40dB  seconds  peak RSS GB  all processes GB  "
          "replies GB" +
          ("  cumulative >=30dB" if args.population else ""))
    found = []
    for clients in args.clients:
        figures = run_one(args, clients, Path(args.out) / f"{args.attack}-{clients}-{time.strftime('%H%M%S')}", extra)
        found.append(figures)
        line = (f"{figures['attack']:<7} {clients:>7} {figures['images']:>7} {figures['share_30db'] or 0:>7.1%} "
                f"{figures['share_40db'] or 0:>7.1%} {figures['worst_round_40db'] or 0:>19.1%} {figures['seconds']:>8} "
                f"{figures['peak_rss_gb']:>12} {figures['peak_total_gb']:>17} "
                f"{figures['replies_gb']:>11}")
        if args.population:
            line += f"  {figures['cumulative_share_30db']:>18.1%}"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
