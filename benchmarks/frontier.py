"""The stealth frontier: what each attack recovers against how often each client detector flags it.

Leakage. For every attack given (default: ig and spear, passive; imprint, mosaic, trap, trap-quiet and qbi,
active), one `fl-sim run` per seed: CIFAR-10, the ConvNet (`cnn`), 10 clients x B = 16, FedSGD (one step of B
images), one round from the model's seeded initialisation, no defense, each attack with its own default settings
(mosaic: the block sized for the round). The clients' images are CIFAR-10 training images no attack has seen (trap,
trap-quiet and qbi set their rows from test images). Each run's metrics.jsonl gives the share of the attacked
images recovered at >= 20 and >= 30 dB after optimal matching; a failed victim's images count as not recovered
(0 dB). A passive attack costs seconds to minutes a victim (ig, spear): it reads the first --passive-victims
clients only, an optimisation (ig) for --iterations. A run is kept in OUT/<attack>-s<seed>/ with its command
(cell.json) and not run again while the command is the same.

Detection. Each attack's flagged share under each detector comes from benchmarks/detectors.py's `--scores` files
(their cnn:cifar10 attacked client-rounds: 10 clients x B = 16, every client of the first rounds of an untrained
and a trained honest FedAvg federation, armed by the server's own code), against the thresholds the code sets
today. A passive attack sends the honest model: its rates are those of the same honest rounds. `suite` is the
share of client-rounds at least one detector flags. False positives: every honest client-round of the files, by
model.

A disguised attack's figures are read from --disguise (docs/data/disguise.json) when that file exists, as given:
{attack, model, psnr_median, share_20db, share_30db, flagged: {detector: share}}, or as benchmarks/disguise.py
writes them (each detector's flagged share of the round the disguised model is sent in, `detectors_first_round`).

    D="python benchmarks/detectors.py"
    $D --models lenet:mnist cnn:cifar10 --scores out/det/lenet-cnn.json
    $D --models lenet:mnist cnn:cifar10 --attack-rounds 0 --seed 1 --scores out/det/heldout.json
    $D --models resnet20:cifar10 --attack-rounds 5 --scores out/det/resnet20.json
    python benchmarks/frontier.py --scores out/det/*.json --json docs/data/frontier.json --png docs/frontier.png
    python benchmarks/frontier.py --plot docs/data/frontier.json --png docs/frontier.png   # redraw, run nothing
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import common
import numpy as np

from fl_sim.results.rows import MetricsRow, read_metrics
from fl_sim.results.summary import attacked, image_count, image_psnrs

DEFAULT_ATTACKS = ("ig", "spear", "imprint", "mosaic", "trap", "trap-quiet", "qbi")
PASSIVE_ROW = "passive (dlg, idlg, ig, fedavg, spear, cocktail)"  # benchmarks/detectors.py's row of the honest model
DETECTION_MODEL = "cnn:cifar10"
SUITE = "suite"  # flagged by at least one detector
CLIENTS, BATCH = 10, 16
THRESHOLDS_DB = (20, 30)
RETRIES = 1  # a run whose Ray start timed out or whose workers died under it (a loaded machine) is run once more
NOTHING_WORKED = 3  # fl-sim run's exit code when no attack succeeded or no round aggregated (trap on every client)
MARKERS = {"inspect": "o", "dsnr": "s", "strict-load": "^", "size": "D", "lone-units": "v", SUITE: "*"}


class FrontierError(Exception):
    """Input the benchmark cannot use (a missing or malformed file); main prints it in one line, exit 2."""


def image_values(rows: list[MetricsRow]) -> np.ndarray:
    """Every attacked image's PSNR over `rows` (a failed victim's images: 0 dB each).

    Parameters
    ----------
    rows : list of MetricsRow
        A run's metrics.jsonl rows.

    Returns
    -------
    numpy.ndarray
        One PSNR per image behind an attacked update.
    """
    values: list[float] = []
    for row in rows:
        if attacked(row):
            psnrs = image_psnrs(row)
            values.extend(psnrs if psnrs is not None else [0.0] * image_count(row))
    return np.asarray(values, dtype=float)


def leakage(values: np.ndarray) -> dict[str, float | int]:
    """The field's figures of a set of per-image PSNRs.

    Parameters
    ----------
    values : numpy.ndarray
        Per-image PSNRs (0 for an image not recovered).

    Returns
    -------
    dict
        images, share_20db, share_30db (shares of the images at or above each threshold), psnr_median.
    """
    if not len(values):
        raise FrontierError("no attacked image in the run: nothing to score")
    return {"images": int(len(values)), **{f"share_{db}db": float(np.mean(values >= db)) for db in THRESHOLDS_DB},
            "psnr_median": float(np.median(values))}


def flag_counts(scores: dict[str, list[float]], limits: dict[str, float]) -> dict[str, list[int]]:
    """Client-rounds each detector flags, and the suite (any detector), out of those scored.

    Parameters
    ----------
    scores : dict
        Detector name -> its score on each client-round, every list in the same client-round order (as
        benchmarks/detectors.py writes them).
    limits : dict
        Detector name -> threshold; a score above it (or not a number) is flagged.

    Returns
    -------
    dict
        Detector name (and SUITE) -> [flagged, client-rounds].
    """
    flags = {name: ~(np.asarray(values, dtype=float) <= limits[name]) for name, values in scores.items()
             if name in limits}
    if not flags:
        raise FrontierError(f"no scores of a known detector ({', '.join(limits)})")
    lengths = {len(values) for values in flags.values()}
    if len(lengths) != 1:
        raise FrontierError("the detectors' score lists differ in length: not the same client-rounds")
    counts = {name: [int(values.sum()), int(len(values))] for name, values in flags.items()}
    counts[SUITE] = [int(np.any(list(flags.values()), axis=0).sum()), lengths.pop()]
    return counts


def read_scores(paths: list[str]) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[float]]]]:
    """The honest scores of every model and the attacked scores of DETECTION_MODEL over --scores files, each list
    the files' lists end to end (several seeds of one model pool).

    Parameters
    ----------
    paths : list of str
        benchmarks/detectors.py `--scores` files.

    Returns
    -------
    tuple of dict
        model:dataset -> detector -> honest scores; attack row -> detector -> scores.
    """
    honest: dict[str, dict[str, list[float]]] = {}
    attacks: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            runs = saved["honest"], saved["attacked"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FrontierError(f"{path}: not a benchmarks/detectors.py --scores file ({error})") from None
        for pair, scores in runs[0].items():
            for name, values in scores.items():
                honest.setdefault(pair, {}).setdefault(name, []).extend(values)
        for row, scores in runs[1].get(DETECTION_MODEL, {}).items():
            for name, values in scores.items():
                attacks.setdefault(row, {}).setdefault(name, []).extend(values)
    if not attacks:
        raise FrontierError(f"no {DETECTION_MODEL} attacked client-rounds in {', '.join(paths)} "
                            "(benchmarks/detectors.py --models cnn:cifar10 with --attack-rounds above 0)")
    return honest, attacks


def detection_row(attack: str, passive: bool) -> str:
    """The row of benchmarks/detectors.py whose client-rounds are what `attack` sends."""
    return PASSIVE_ROW if passive else attack


def assemble(runs: dict[str, dict[int, np.ndarray]], kinds: dict[str, str], attacked_scores: dict,
             honest_scores: dict, limits: dict[str, float], conditions: dict) -> dict:
    """The frontier's figures: each attack's leakage (pooled over seeds, and its worst seed) and detection rates,
    and each detector's false positives.

    Parameters
    ----------
    runs : dict
        Attack -> seed -> per-image PSNRs of that seed's run.
    kinds : dict
        Attack -> "passive" or "active".
    attacked_scores : dict
        benchmarks/detectors.py's attacked rows of DETECTION_MODEL (row -> detector -> scores).
    honest_scores : dict
        model:dataset -> detector -> honest scores.
    limits : dict
        Detector -> threshold.
    conditions : dict
        What the figures were measured under (kept in the JSON).

    Returns
    -------
    dict
        detectors, thresholds, conditions, attacks (a list of entries) and false_positives.
    """
    entries = []
    for attack, by_seed in runs.items():
        row = detection_row(attack, kinds[attack] == "passive")
        if row not in attacked_scores:
            raise FrontierError(f"the scores files hold no {DETECTION_MODEL} row {row!r} for {attack}")
        counts = flag_counts(attacked_scores[row], limits)
        pooled = leakage(np.concatenate(list(by_seed.values())))
        per_seed = {seed: leakage(values) for seed, values in sorted(by_seed.items())}
        entries.append({"attack": attack, "kind": kinds[attack], "model": "cnn", **pooled,
                        "seeds": sorted(by_seed), "worst_30db": min(f["share_30db"] for f in per_seed.values()),
                        "flagged": {name: k / n for name, (k, n) in counts.items()}, "flagged_of": counts,
                        "detection_row": row})
    return {"detectors": [*limits, SUITE], "thresholds": limits, "conditions": conditions, "attacks": entries,
            "false_positives": {pair: flag_counts(scores, limits) for pair, scores in honest_scores.items()}}


def add_disguise(figures: dict, path: Path) -> dict:
    """`figures` with the disguised attack of `path` added (replacing an entry of the same attack), when the file
    exists; unchanged otherwise.

    Parameters
    ----------
    figures : dict
        The frontier's figures (`assemble`).
    path : pathlib.Path
        The disguised attack's figures: {attack, model, psnr_median, share_20db, share_30db, flagged}.

    Returns
    -------
    dict
        The figures, the disguised attack last.
    """
    if not path.is_file():
        return figures
    try:
        found = json.loads(path.read_text())
        images = found.get("images", found.get("simulation", {}).get("rounds"))  # disguise.py: one image a round
        entry = {"attack": str(found["attack"]), "kind": "disguised", "model": str(found.get("model", "?")),
                 "images": images, "share_20db": float(found["share_20db"]),
                 "share_30db": float(found["share_30db"]), "psnr_median": float(found["psnr_median"]),
                 "source": str(path)}
        if "flagged" in found:
            entry["flagged"] = {str(name): float(share) for name, share in found["flagged"].items()}
        else:  # benchmarks/disguise.py's file: each detector's share of the round the model is sent in
            sent = found["detectors_first_round"]
            entry["flagged"] = {str(name): float(d["flagged_share"]) for name, d in sent.items()}
            entry["flagged_of"] = {str(name): [round(d["flagged_share"] * d["client_rounds"]), d["client_rounds"]]
                                   for name, d in sent.items()}
            if not any(entry["flagged"].values()):  # none flagged by any detector: none by the suite either
                rounds = max(d["client_rounds"] for d in sent.values())
                entry["flagged"][SUITE], entry["flagged_of"][SUITE] = 0.0, [0, rounds]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise FrontierError(f"{path}: not the disguised attack's figures ({error!r})") from None
    kept = [other for other in figures["attacks"] if other["attack"] != entry["attack"]]
    return {**figures, "attacks": [*kept, entry]}


def percent(share: float | None, of: list[int] | None = None) -> str:
    """A share as a table cell: 100%, 2% (3/200); n/m when not measured."""
    if share is None:
        return "n/m"
    text = f"{share:.0%}" if share in (0.0, 1.0) or 0.01 <= share <= 0.99 else f"{share:.1%}"  # never 100% for 99.7%
    return text + (f" ({of[0]}/{of[1]})" if of is not None and 0 < of[0] < of[1] else "")


def table(figures: dict) -> str:
    """The frontier's two markdown tables: each attack's leakage and detection rates, and each detector's false
    positives over the honest client-rounds.

    Parameters
    ----------
    figures : dict
        The frontier's figures (`assemble`, `add_disguise`).

    Returns
    -------
    str
        Markdown.
    """
    names = figures["detectors"]
    lines = ["| attack | kind | images | >= 20 dB | >= 30 dB | PSNR median | " + " | ".join(names) + " |",
             "| --- | --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(names)]
    for entry in figures["attacks"]:
        of = entry.get("flagged_of", {})
        images = entry.get("images")
        lines.append(f"| {entry['attack']} ({entry['model']}) | {entry['kind']} | {images if images else 'n/m'} | "
                     f"{percent(entry['share_20db'])} | {percent(entry['share_30db'])} | "
                     f"{entry['psnr_median']:.1f} dB | "
                     + " | ".join(percent(entry["flagged"].get(name), of.get(name)) for name in names) + " |")
    lines += ["", "| model | honest client-rounds | " + " | ".join(names) + " |",
              "| --- | ---: |" + " ---: |" * len(names)]
    for pair, counts in figures["false_positives"].items():
        total = next(iter(counts.values()))[1]
        lines.append(f"| {pair} | {total:,} | " + " | ".join(
            f"{counts[name][0]} ({counts[name][0] / counts[name][1]:.1%})" if name in counts else "n/m"
            for name in names) + " |")
    return "\n".join(lines)


def spread(count: int, index: int, width: float) -> float:
    """The offset of item `index` of `count` spread evenly over [-width, width] (0 for one item)."""
    return 0.0 if count < 2 else -width + 2 * width * index / (count - 1)


def plot(figures: dict, path: str) -> list[tuple[str, str, float, float]]:
    """Leakage against detection rate, one point per attack and detector: share of the images at >= 30 dB (left)
    and >= 20 dB (right) against the share of client-rounds the detector flags; colour per attack, marker per
    detector; coincident points spread by at most 0.03 on each axis.

    Parameters
    ----------
    figures : dict
        The frontier's figures.
    path : str
        The PNG to write.

    Returns
    -------
    list of tuple
        Each point drawn on the left panel, before the spread: (attack, detector, detection rate, share >= 30 dB).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names, entries = figures["detectors"], figures["attacks"]
    colours = matplotlib.colormaps["tab10"]
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.8), sharex=True, sharey=True)
    drawn: list[tuple[str, str, float, float]] = []
    for panel, db in zip(panels, (30, 20)):
        for a, entry in enumerate(entries):
            y = entry[f"share_{db}db"]
            for d, name in enumerate(names):
                x = entry["flagged"].get(name)
                if x is None:
                    continue
                if db == 30:
                    drawn.append((entry["attack"], name, x, y))
                panel.scatter(x + spread(len(names), d, 0.03), y + spread(len(entries), a, 0.03),
                              marker=MARKERS.get(name, "P"), color=colours(a % 10), s=70 if name == SUITE else 40,
                              edgecolors="black", linewidths=0.4, zorder=3)
        panel.set_title(f"images recovered at >= {db} dB")
        panel.set_xlabel("client-rounds the detector flags")
        panel.set_xlim(-0.08, 1.08)
        panel.set_ylim(-0.08, 1.08)
        panel.axvspan(-0.08, 0.01, color="green", alpha=0.08, zorder=0)
        panel.grid(alpha=0.3)
    panels[0].set_ylabel("share of the round's images")
    attack_keys = [Line2D([], [], marker="o", linestyle="", color=colours(a % 10),
                          label=f"{entry['attack']} ({entry['kind']})") for a, entry in enumerate(entries)]
    detector_keys = [Line2D([], [], marker=MARKERS.get(name, "P"), linestyle="", color="grey", label=name)
                     for name in names]
    panels[1].legend(handles=attack_keys + detector_keys, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle("leakage against detection, CIFAR-10 cnn, 10 clients x B = 16 (shaded: flagged <= 1%)",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def run_attack(attack: str, seed: int, args: argparse.Namespace) -> np.ndarray:
    """One `fl-sim run` of `attack` (or its cached result with the same command): its images' PSNRs."""
    from fl_sim.contract.attacks import attack_spec

    spec = attack_spec(attack)
    folder = Path(args.out) / f"{attack}-s{seed}"
    command = [str(Path(sys.executable).parent / "fl-sim"), "run", "--dataset", "cifar10", "--data-root",
               args.data_root, "--model", "cnn", "--num-clients", str(CLIENTS), "--rounds", "1", "--train-mode",
               "fedsgd", "--batch-size", str(BATCH), "--attack", attack, "--seed", str(seed),
               "--max-attack-images", str(CLIENTS * BATCH), "--out", str(folder / "run")]
    if str(spec.kind) == "passive":  # seconds to minutes a victim: the first --passive-victims clients
        command += ["--attack-clients", ",".join(str(c) for c in range(args.passive_victims))]
    if spec.preset is not None:  # an optimisation (dlg, idlg, ig, fedavg)
        command += ["--iterations", str(args.iterations)]
    cell = folder / "cell.json"
    if cell.is_file() and json.loads(cell.read_text()).get("command") == command:
        return image_values(read_metrics(folder / "run" / "metrics.jsonl"))
    for _ in range(1 + RETRIES):
        shutil.rmtree(folder / "run", ignore_errors=True)  # a run of another command, or one that stopped part way
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(command, capture_output=True, text=True)
        rows = read_metrics(folder / "run" / "metrics.jsonl")
        if done.returncode in (0, NOTHING_WORKED) and rows:
            break
    else:
        raise SystemExit(f"fl-sim run --attack {attack} --seed {seed} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    cell.write_text(json.dumps({"command": command, "returncode": done.returncode,
                                "summary": done.stdout.strip().splitlines()[-1:]}))
    return image_values(rows)


def measure(args: argparse.Namespace) -> dict:
    """Every attack's runs and the detectors' scores, assembled."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from detectors import thresholds

    from fl_sim.contract.attacks import attack_spec, find_attack

    honest, attacked_scores = read_scores(args.scores)
    for attack in args.attacks:
        if find_attack(attack) is None:
            raise FrontierError(f"no attack is named {attack!r}")
        if not attack_spec(attack).reaches("cnn"):
            raise FrontierError(f"--attack {attack} does not reach the cnn")
    runs: dict[str, dict[int, np.ndarray]] = {}
    for attack in args.attacks:
        for seed in args.seeds:
            runs.setdefault(attack, {})[seed] = run_attack(attack, seed, args)
            found = leakage(runs[attack][seed])
            print(f"<!-- {attack} seed {seed}: {found['images']} images, {found['share_20db']:.0%} >= 20 dB, "
                  f"{found['share_30db']:.0%} >= 30 dB, PSNR median {found['psnr_median']:.1f} dB -->", flush=True)
    kinds = {attack: str(attack_spec(attack).kind) for attack in args.attacks}
    conditions = {"dataset": "cifar10", "model": "cnn", "clients": CLIENTS, "batch_size": BATCH,
                  "train_mode": "fedsgd", "rounds": 1, "seeds": args.seeds, "passive_victims": args.passive_victims,
                  "iterations": args.iterations, "scores": args.scores}
    return assemble(runs, kinds, attacked_scores, honest, thresholds(), conditions)


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--passive-victims", type=int, default=3,
                        help="clients ig and spear read (their cost is per victim)")
    parser.add_argument("--iterations", type=int, default=100, help="ig's iterations per victim")
    parser.add_argument("--scores", nargs="+", metavar="JSON", help="benchmarks/detectors.py --scores files")
    parser.add_argument("--disguise", default=str(common.ROOT / "docs" / "data" / "disguise.json"),
                        help="the disguised attack's figures, added when the file exists (default %(default)s)")
    parser.add_argument("--json", help="write the figures to this file (with --plot: the files' figures merged)")
    parser.add_argument("--png", help="draw the frontier into this file")
    parser.add_argument("--plot", nargs="+", metavar="JSON",
                        help="run nothing: the table and plot of these --json files (a later file's attacks replace "
                             "an earlier's of the same name)")
    common.add_data_root(parser)
    common.add_out(parser, "out/frontier", "the runs' folders")
    args = parser.parse_args()
    try:
        if args.plot:
            figures = load(args.plot)
        elif not args.scores:
            raise FrontierError("--scores (benchmarks/detectors.py --scores files) or --plot is needed")
        else:
            if args.passive_victims < 1 or args.passive_victims > CLIENTS:
                raise FrontierError(f"--passive-victims must be 1 to {CLIENTS}")
            figures = measure(args)
        if args.json:  # the attacks measured (or merged from --plot files); the disguised one is added when drawn
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        figures = add_disguise(figures, Path(args.disguise))
    except FrontierError as error:
        print(f"frontier: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(table(figures))
    if args.png:
        plot(figures, args.png)


def load(paths: list[str]) -> dict:
    """The figures of --json files: the first file's, with every later file's attacks added (replacing those of the
    same name).

    Parameters
    ----------
    paths : list of str
        Files `--json` wrote.

    Returns
    -------
    dict
        The figures.
    """
    figures: dict | None = None
    for path in paths:
        try:
            found = json.loads(Path(path).read_text())
            found["attacks"], found["detectors"], found["false_positives"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FrontierError(f"{path}: not a frontier --json file ({error!r})") from None
        if figures is None:
            figures = found
            continue
        names = {entry["attack"] for entry in found["attacks"]}
        figures["attacks"] = [e for e in figures["attacks"] if e["attack"] not in names] + found["attacks"]
    assert figures is not None
    return figures


if __name__ == "__main__":
    main()
