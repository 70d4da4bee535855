"""The FedAvg attack against replayed IG and the no-replay baseline, on the same victims at the same budget.

Each cell is one `fl-sim attack` run per attack (real client code: epochs mode, the client's private
shuffle, fl-sim's metrics), so the three attacks see the same victims (same --seed, same shards). It prints a
markdown table (PSNR median and worst image, share of images at >= 20 dB, Dimitrov et al.'s "recovered",
the same criterion carried to this data set's contrast from FEMNIST's, where the paper set it
(fl_sim.results.metrics.contrast_matched_db: 14.1 dB on MNIST), and at >= 30 dB, labels right, attack seconds
per victim) and plots the share recovered against E:

    OMP_NUM_THREADS=1 python benchmarks/fedavg_leakage.py --epochs 1 2 5 10 --shard-size 10 --batch-size 5 \\
        --victims 4 --seeds 0 1 --iterations 100 --out out/fedavg-leakage

Runs already in --out are read back, not redone, so an interrupted grid resumes where it stopped.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import common

from fl_sim.learning.data import load_dataset
from fl_sim.results.metrics import contrast_matched_db
from fl_sim.results.outputs import read_jsonl

ATTACKS = {"fedavg": ["--attack", "fedavg"], "ig": ["--attack", "ig"],
           "ig-no-replay": ["--attack", "ig", "--no-replay"]}
RECOVERED_PSNR = 20.0  # Dimitrov et al.'s criterion: an image is recovered above 20 dB (their --delta)


def run_cell(args: argparse.Namespace, attack: str, epochs: int, seed: int) -> Path:
    """One fl-sim attack run (skipped when its summary exists); returns its output folder."""
    out = Path(args.out) / f"{args.dataset}-{args.model}-n{args.shard_size}-b{args.batch_size}-e{epochs}" / \
        f"{attack}-seed{seed}"
    if (out / "summary.json").exists():
        return out
    command = [str(Path(sys.executable).parent / "fl-sim"), "attack", *ATTACKS[attack], "--dataset", args.dataset,
               "--data-root", args.data_root, "--model", args.model, "--train-mode", "epochs",
               "--epochs", str(epochs), "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--momentum", str(args.momentum), "--iterations", str(args.iterations),
               "--num-victims", str(args.victims),
               "--seed", str(seed), "--out", str(out), "--force"]
    if args.label_deals:  # every attack the same rows per victim: a like-for-like budget
        command += ["--label-deals", str(args.label_deals)]
    subprocess.run(command, check=False, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                   stdout=subprocess.DEVNULL)
    return out


def matched_threshold(dataset: str, data_root: str) -> float:
    """Dimitrov et al.'s 20 dB (set on FEMNIST) carried to this data set's pixel contrast (its train split)."""
    data = load_dataset(dataset, data_root, train=True)
    images, _ = data.tensors(range(len(data)))
    return contrast_matched_db(RECOVERED_PSNR, float(images.std()))


def cell_figures(folders: list[Path], matched_db: float) -> dict[str, float] | None:
    """Pooled over seeds: every image's PSNR (a failed victim's images count as unrecovered)."""
    images: list[float] = []
    labels: list[float] = []
    seconds: list[float] = []
    for folder in folders:
        if not (folder / "summary.json").exists():
            return None
        summary = json.loads((folder / "summary.json").read_text())
        seconds.append(summary["attack_seconds_per_victim"])
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            count = len(row.get("true_labels") or [])
            images += row.get("psnr_images") or [0.0] * count
            labels.append(row.get("label_share") or 0.0)
    if not images:
        return None
    return {"psnr_median": statistics.median(images), "psnr_worst": min(images),
            "at_20": sum(p >= RECOVERED_PSNR for p in images) / len(images),
            "at_matched": sum(p >= matched_db for p in images) / len(images),
            "at_30": sum(p >= 30 for p in images) / len(images), "labels": statistics.mean(labels),
            "seconds": statistics.mean(seconds), "images": len(images)}


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--dataset", default="mnist")
    common.add_data_root(parser)
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.0, help="the clients' SGD momentum (fl-sim run's is 0.9)")
    parser.add_argument("--victims", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--label-deals", type=int, default=0,
                        help="each attack's deals of the recovered labels into steps (fl-sim attack --label-deals; "
                             "0: the presets', 8 for ig; 1 gives every attack one row per victim, as fedavg's epoch "
                             "copies have in epochs mode)")
    common.add_out(parser, "out/fedavg-leakage")
    args = parser.parse_args()

    table: dict[tuple[str, int], dict[str, float]] = {}
    matched_db = matched_threshold(args.dataset, args.data_root)
    for epochs in args.epochs:
        for attack in args.attacks:
            folders = [run_cell(args, attack, epochs, seed) for seed in args.seeds]
            found = cell_figures(folders, matched_db)
            if found is not None:
                table[(attack, epochs)] = found
    print(f"{args.dataset}, {args.model}, n = {args.shard_size}, B = {args.batch_size}, lr {args.lr}, "
          f"momentum {args.momentum}, {args.iterations} iterations, {args.victims} victims x seeds {args.seeds}, "
          f"label deals {args.label_deals or 'the presets'}")
    print(f"| E | attack | images | PSNR median | worst | >= 20 dB (recovered) | >= {matched_db:.1f} dB "
          "(FEMNIST-matched) | >= 30 dB | labels right | s / victim |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (attack, epochs), f in table.items():
        print(f"| {epochs} | {attack} | {f['images']:.0f} | {f['psnr_median']:.1f} | {f['psnr_worst']:.1f} | "
              f"{f['at_20']:.0%} | {f['at_matched']:.0%} | {f['at_30']:.0%} | {f['labels']:.0%} | {f['seconds']:.0f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for attack in args.attacks:
        points = sorted((e, f) for (a, e), f in table.items() if a == attack)
        if points:
            axes[0].plot([e for e, _ in points], [f["at_20"] for _, f in points], marker="o", label=attack)
            axes[1].plot([e for e, _ in points], [f["psnr_median"] for _, f in points], marker="o", label=attack)
    axes[0].set(xlabel="local epochs E", ylabel="share of images >= 20 dB", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="local epochs E", ylabel="PSNR median (dB)")
    axes[1].legend()
    figure.suptitle(f"{args.dataset} {args.model}, n = {args.shard_size}, B = {args.batch_size}, lr {args.lr}, "
                    f"momentum {args.momentum}, {args.iterations} iterations")
    figure.tight_layout()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot = Path(args.out) / f"fedavg-vs-epochs-{args.dataset}-{args.model}-n{args.shard_size}-b{args.batch_size}.png"
    figure.savefig(plot, dpi=120)
    print(f"plot: {plot}")
    gallery = write_gallery(args, [e for e in args.epochs if any((a, e) in table for a in args.attacks)])
    if gallery is not None:
        print(f"gallery: {gallery}")


def write_gallery(args: argparse.Namespace, epochs: list[int]) -> Path | None:
    """One picture: for each E, the first victim of the first seed, its true images and each attack's
    reconstruction (fl-sim attack's truth.png / reconstruction.png strips, images matched to the truth)."""
    import matplotlib.image
    import matplotlib.pyplot as plt

    rows: list[tuple[str, Path]] = []
    truths: dict[bytes, tuple[int, list[int]]] = {}  # a truth strip -> its row, and the E values it stands for
    for epochs_ in epochs:
        cell = Path(args.out) / f"{args.dataset}-{args.model}-n{args.shard_size}-b{args.batch_size}-e{epochs_}"
        found = [(attack, cell / f"{attack}-seed{args.seeds[0]}" / "victim-000") for attack in args.attacks]
        found = [(attack, folder) for attack, folder in found if (folder / "reconstruction.png").exists()]
        if not found:
            continue
        truth = (found[0][1] / "truth.png").read_bytes()
        if truth not in truths:  # the same victim holds the same images at every E: each truth is shown once
            truths[truth] = (len(rows), [])
            rows.append(("truth", found[0][1] / "truth.png"))
        truths[truth][1].append(epochs_)
        for attack, folder in found:
            psnr = _victim_psnr(folder.parent, 0)
            rows.append((f"E = {epochs_}: {attack}" + (f" ({psnr:.1f} dB median)" if psnr is not None else ""),
                         folder / "reconstruction.png"))
    if not rows:
        return None
    for row, shown in truths.values():
        rows[row] = (f"truth, E = {', '.join(map(str, shown))}", rows[row][1])
    strips = [matplotlib.image.imread(path) for _, path in rows]
    width = max(strip.shape[1] for strip in strips)
    figure, axes = plt.subplots(len(rows), 1, figsize=(min(16, 1 + width / 90), 0.75 * len(rows) + 0.6),
                                squeeze=False)
    for ax, (title, _), strip in zip(axes[:, 0], rows, strips):
        ax.imshow(strip, cmap="gray" if strip.ndim == 2 else None, aspect="equal")
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    figure.suptitle(f"{args.dataset} {args.model}, n = {args.shard_size}, B = {args.batch_size}, lr {args.lr}, "
                    f"momentum {args.momentum}, {args.iterations} iterations: seed {args.seeds[0]}, victim 0",
                    fontsize=9)
    figure.tight_layout()
    path = Path(args.out) / f"fedavg-gallery-{args.dataset}-{args.model}-n{args.shard_size}-b{args.batch_size}.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _victim_psnr(folder: Path, victim: int) -> float | None:
    """The median PSNR of one victim's images, from the run's metrics.jsonl (victims in order)."""
    rows = read_jsonl(folder / "metrics.jsonl")
    images = (rows[victim].get("psnr_images") or []) if len(rows) > victim else []
    return statistics.median(images) if images else None


if __name__ == "__main__":
    main()
