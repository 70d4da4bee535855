"""`fl-sim sweep`: every point of a grid of settings, each an `fl-sim attack` (or `fl-sim run`), resumable.

Each point writes into OUT/points/<key=value,...>/ and is finished once its summary.json exists, so a
sweep that stops is continued by running the same command again. A finished point also keeps its whole
config (point.json: the command and every flag that decides its result); it is reused only when that
matches what this sweep asks for, so changing a flag that is not swept cannot mix settings in one
table: the sweep stops and names the difference, or (--force) runs the point again. OUT/sweep.json
records the grid; OUT/results.csv, the plots and OUT/index.html are rebuilt from the points' summaries
(fl_sim/commands/report.py).
"""
import argparse
import itertools
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fl_sim.commands import attack, config, guard, report, run
from fl_sim.contract.records import REPLY_FAULTS
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model, count_parameters
from fl_sim.results.evaluation import summarise
from fl_sim.results.outputs import write_json
from fl_sim.results.preflight import check_run
from fl_sim.results.rows import read_global, read_metrics
from fl_sim.server import lock

MODES = {"attack": attack, "run": run}
# Flags a grid cannot vary: where the sweep writes, and how it runs.
NOT_SWEPT = {"out", "resume", "grid", "mode", "help", "force"}
POINT_CONFIG = "point.json"  # a finished point's config, compared before it is reused
# Flags that do not change a point's result (as `fl-sim run --resume` allows them to change) or are the sweep's.
NOT_COMPARED = {"out", "resume", "force", "help", "data_root", "device", "client_cpus", "client_gpus"}
TRUE_WORDS, FALSE_WORDS = {"true", "yes", "1"}, {"false", "no", "0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run.add_arguments(parser)  # the task and federation flags; attack mode ignores the federation ones
    # sweeps default to the research setting of fl-sim attack (not fl-sim run's demo federation), whole shards
    parser.set_defaults(**config.TASK_OVERRIDES, min_shard=1, max_shard=0)
    parser.add_argument("--num-victims", type=int, default=4, help="attack mode: clients attacked at each point")
    parser.add_argument("--grid", required=True, metavar='"KEY=v1,v2 [KEY2=...]"',
                        help="flags (without dashes) and the values to try; every combination is one point, "
                             "e.g. \"batch-size=1,2,4 no-replay=true,false\"")
    parser.add_argument("--mode", choices=tuple(MODES), default="attack",
                        help="attack: fl-sim attack at each point (default); run: a full Flower simulation")
    parser.add_argument("--force", action="store_true",
                        help="run again the finished points whose recorded config differs from this sweep's "
                             "(without it such a point stops the sweep)")


def parse_grid(text: str, parser: argparse.ArgumentParser, mode: str) -> dict[str, list]:
    """{flag dest: [typed values]} from "KEY=v1,v2 KEY2=..."; one ConfigError names the first bad key or value."""
    options = {action.option_strings[0][2:]: action for action in _actions(parser)}
    target = {action.dest for action in _actions(_parser_of(MODES[mode]))}
    grid = {}
    for item in text.split():
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise config.ConfigError(f"--grid item {item!r} is not KEY=v1,v2,...")
        action = options.get(key)
        if action is None or action.dest in NOT_SWEPT:
            raise config.ConfigError(f"--grid key {key!r} is not a flag a sweep can vary "
                                     f"(try: {', '.join(k for k, a in options.items() if a.dest not in NOT_SWEPT)})")
        if action.dest not in target:
            raise config.ConfigError(f"--grid key {key!r} means nothing to fl-sim {mode}; use the other --mode")
        if action.dest in grid:
            raise config.ConfigError(f"--grid key {key!r} is given twice")
        grid[action.dest] = [_typed(key, action, value) for value in values.split(",")]
    if not grid:
        raise config.ConfigError("--grid names no KEY=values")
    return grid


def _typed(key: str, action: argparse.Action, value: str):
    if isinstance(action, argparse._StoreTrueAction):
        if value.lower() in TRUE_WORDS | FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise config.ConfigError(f"--grid {key}: {value!r} is neither true nor false")
    convert = action.type if callable(action.type) else None
    try:
        typed = convert(value) if convert else value
    except ValueError:
        raise config.ConfigError(f"--grid {key}: {value!r} is not a valid {getattr(convert, '__name__', 'value')}") \
            from None
    if action.choices is not None and typed not in action.choices:
        raise config.ConfigError(f"--grid {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return typed


def points(grid: dict[str, list]) -> list[dict]:
    """Every combination, the first key varying slowest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def point_name(settings: dict) -> str:
    """The point's folder name, key=value joined by commas; characters unsafe in a file name become '_'."""
    text = ",".join(f"{dest.replace('_', '-')}={_text(value)}" for dest, value in settings.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def point_arguments(args, mode: str, settings: dict, folder: Path, fresh: bool = False) -> argparse.Namespace:
    """The target command's namespace: its defaults, the sweep's flags, the point's settings, its own folder.

    The folder is the sweep's: an attack point may clear what an unfinished try left there (`force`), a run
    point stopped mid-way is continued, unless `fresh` (its folder is about to be emptied)."""
    target = _parser_of(MODES[mode]).parse_args(["--out", str(folder)] if mode == "attack" else [])
    for dest in vars(target):
        if hasattr(args, dest) and dest not in NOT_SWEPT:
            setattr(target, dest, getattr(args, dest))
    for dest, value in settings.items():
        setattr(target, dest, value)
    target.out = str(folder)
    if mode == "attack":
        target.force = True
    if mode == "run" and (folder / "run.json").exists() and not fresh:  # stopped mid-way: fl-sim run continues it
        target.out, target.resume = None, str(folder)
    return target


def point_config(mode: str, point_args: argparse.Namespace) -> dict:
    """What decides a point's result: its command and every flag of it (as JSON would store them)."""
    flags = {dest.replace("_", "-"): value for dest, value in sorted(vars(point_args).items())
             if dest not in NOT_COMPARED}
    return json.loads(json.dumps({"mode": mode, "flags": flags}, default=str))


def _with_new_flags(stored: dict, wanted: dict) -> dict:
    """`stored` with the flags fl-sim gained since the point ran, where this sweep leaves them at their
    defaults: the point ran without them, which is what their defaults do."""
    if stored.get("mode") not in MODES or wanted.get("mode") != stored.get("mode"):
        return stored
    parser = _parser_of(MODES[stored["mode"]])
    flags = dict(stored.get("flags", {}))
    for key, value in wanted["flags"].items():
        default = json.loads(json.dumps(parser.get_default(key.replace("-", "_")), default=str))
        if key not in flags and value == default:
            flags[key] = value
    return {**stored, "flags": flags}


def finished_and_same(folder: Path, wanted: dict, force: bool) -> bool:
    """True when the point is finished with the config `wanted`, so it is reused; False when it must run
    (unfinished, or finished otherwise and `force`). A finished point with another config is an error."""
    if not (folder / "summary.json").exists():
        return False
    path = folder / POINT_CONFIG
    stored = _with_new_flags(json.loads(path.read_text()), wanted) if path.exists() else None
    if stored == wanted or force:
        return stored == wanted
    if stored is None:
        raise config.ConfigError(f"point {folder.name!r} was run without a record of its config ({POINT_CONFIG}), so "
                                 "it cannot be checked against this sweep: add --force to run it again, or use "
                                 "another --out")
    before, now = stored.get("flags", {}), wanted["flags"]
    differing = [f"--{key} {before.get(key, '(unset)')} (this sweep: {now.get(key, '(unset)')})"
                 for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if stored.get("mode") != wanted["mode"]:
        differing.insert(0, f"--mode {stored.get('mode')} (this sweep: {wanted['mode']})")
    raise config.ConfigError(f"point {folder.name!r} was run with {', '.join(differing)}: run the sweep with the same "
                             "flags, use another --out, or add --force to run the point again")


def check(args) -> list[tuple[dict, Path, argparse.Namespace, bool]]:
    """Every point with its folder, arguments and whether it is finished already (reused), each checked by
    its command, and finished ones against their recorded config, before any point runs."""
    if args.resume is not None:
        raise config.ConfigError("fl-sim sweep continues by itself: run the same command again with the same --out")
    if args.out is None:
        raise config.ConfigError("fl-sim sweep needs --out")
    guard.check_new_folder(args.out, "sweep", "sweep.json")
    guard.check_outside_data(args.out, args.data_root)
    guard.check_device(args.device)
    if args.mode == "run":
        guard.check_client_resources(args.client_cpus, args.client_gpus)
    grid = parse_grid(args.grid, sweep_parser(), args.mode)
    _check_sweep_record(Path(args.out), args.mode, grid)
    planned: list = []
    names: dict[str, dict] = {}
    for settings in points(grid):
        name = point_name(settings)
        if name in names:
            raise config.ConfigError(f"grid points {names[name]} and {settings} would share the folder {name!r}")
        names[name] = settings
        folder = Path(args.out) / "points" / name
        point_args = point_arguments(args, args.mode, settings, folder)
        done = finished_and_same(folder, point_config(args.mode, point_args), getattr(args, "force", False))
        if not done and (folder / "summary.json").exists():  # finished with other settings, and --force: redo
            point_args = point_arguments(args, args.mode, settings, folder, fresh=True)
        if args.mode == "attack":
            attack.check(point_args)
        elif point_args.resume is None:  # a stopped run is checked by fl-sim run --resume itself
            check_run(run.config_from_flags(point_args))
        planned.append((settings, folder, point_args, done))
    return planned


def _check_sweep_record(out: Path, mode: str, grid: dict) -> None:
    """A folder holding another mode's sweep, or a sweep over other keys, would mix incomparable points in one
    table (empty cells, plots of nothing): refused. The same keys with more values widen the sweep."""
    path = out / "sweep.json"
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text())
        previous, keys = record["mode"], list(record["grid"])
    except (ValueError, KeyError, TypeError) as error:
        raise config.ConfigError(f"{str(path)!r} cannot be read ({type(error).__name__}): it is not a sweep record "
                                 "fl-sim wrote; use another --out") from None
    if previous != mode:
        raise config.ConfigError(f"{str(out)!r} holds a --mode {previous} sweep; use another --out")
    wanted = [dest.replace("_", "-") for dest in grid]
    if sorted(keys) != sorted(wanted):
        held = " ".join(f"{key}={','.join(map(str, values))}" for key, values in record["grid"].items())
        raise config.ConfigError(f"{str(out)!r} holds a sweep over --grid \"{held}\", not over "
                                 f"{', '.join(wanted)}: a grid may add values to those keys; sweep other keys "
                                 "into another --out")


def run_sweep(args) -> list[dict]:
    """Runs the sweep's points not done before, holding OUT's lock (fl_sim/server/lock.py, as a run holds its
    folder's): a second sweep into the same folder is refused naming the first instead of running every point
    again beside it."""
    planned = check(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with lock.hold(out, "fl-sim sweep"):
        return sweep_points(args, planned, out)


def sweep_points(args, planned: list, out: Path) -> list[dict]:
    """run_sweep's points, with OUT locked."""
    grid = {dest: [_text(v) for v in values]
            for dest, values in parse_grid(args.grid, sweep_parser(), args.mode).items()}
    record = _merged_record(out, args.mode, grid, [settings for settings, _, _, _ in planned])
    write_json(out / "sweep.json", record)
    for number, (settings, folder, point_args, done) in enumerate(planned, 1):
        label = f"[{number}/{len(planned)}] {point_name(settings)}"
        if done:
            print(f"{label}: done before with the same config, skipped", flush=True)
            continue
        if (folder / "summary.json").exists():  # finished with another config: --force asked to redo it
            print(f"{label}: done before with another config, running again (--force)", flush=True)
            shutil.rmtree(folder)
        else:
            print(f"{label}: running", flush=True)
        try:
            summary = run_point(args.mode, point_args, folder)
        except guard.Interrupted as interrupt:
            interrupt.detail = (f"at point {number} of {len(planned)} ({point_name(settings)}); the finished "
                                f"points are kept: continue with the same fl-sim sweep command")
            raise
        print(f"{label}: PSNR median {_number(summary.get('psnr_median'))} dB, "
              f"{summary['seconds']:.1f} s", flush=True)
    return report.build_sweep(out)


def _merged_record(out: Path, mode: str, grid: dict, planned: list[dict]) -> dict:
    """sweep.json: this grid joined with an earlier one in OUT, so widening a grid keeps the points already run."""
    path = out / "sweep.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"mode": mode, "grid": {}, "points": []}
    for dest, values in grid.items():
        known = record["grid"].setdefault(dest.replace("_", "-"), [])
        known.extend(value for value in values if value not in known)
    folders = {point["folder"] for point in record["points"]}
    for settings in planned:
        if point_name(settings) not in folders:
            record["points"].append({"folder": point_name(settings),
                                     "settings": {dest.replace("_", "-"): _text(v) for dest, v in settings.items()}})
    return record


def run_point(mode: str, point_args, folder: Path) -> dict:
    """Runs one point and writes its config (point.json), then its summary.json (last, so a point that
    stops is run again)."""
    started = time.perf_counter()
    if mode == "attack":
        summary = attack.run(point_args)
    else:
        run.run(point_args)
        rows = [row for row in read_metrics(folder / "metrics.jsonl") if row.status not in REPLY_FAULTS]
        global_rows = read_global(folder / "global.jsonl")
        summary = {**summarise(rows), "rounds": len(global_rows),
                   "accuracy": global_rows[-1].accuracy if global_rows else None}
    summary["parameters"] = count_parameters(_global_model(point_args)[1])
    summary["seconds"] = time.perf_counter() - started
    write_json(folder / POINT_CONFIG, point_config(mode, point_args))
    write_json(folder / "summary.json", summary)
    return summary


def _global_model(args):
    """The data set and the model the server sends, as fl-sim attack builds them."""
    dataset = load_dataset(args.dataset, args.data_root, train=True)
    return dataset, build_model(args.model, dataset.channels, dataset.image_size, dataset.num_classes,
                                init=args.init, seed=args.seed)


def sweep_parser() -> argparse.ArgumentParser:
    return _parser_of(sys.modules[__name__])


def _actions(parser: argparse.ArgumentParser):
    return [action for action in parser._actions if action.option_strings and action.option_strings[0].startswith("--")]


def _parser_of(module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    return parser


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def main(args) -> int:
    rows = run_sweep(args)
    print(f"fl-sim sweep: {len(rows)} point(s) in {args.out}/results.csv, plots and index.html")
    return 0
