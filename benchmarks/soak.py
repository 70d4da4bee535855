"""A long run watched from outside: memory, file handles, Ray workers and seconds per round over hundreds of rounds.

Starts one `fl-sim run` (a fresh process) and, each time `--every` more rounds are in OUT/global.jsonl, reads
/proc for the server process (the `fl-sim run` process: the ServerApp, the strategy, the attack) and for every
Ray worker among its descendants (`ray::` processes: the ClientApps). It prints one line per sample:

    round  s/round  server RSS MB  workers RSS MB (sum)  workers  server fds  workers fds (sum)

`s/round` is the mean wall time of the rounds since the sample before (from the `elapsed_seconds` of the global
rows). Then it prints the growth from the sample at `--baseline` (round 50 by default) to the last one: the
server's RSS in per cent, seconds per round in per cent, and the change of the handle and worker counts.

    python benchmarks/soak.py --rounds 300 --clients 10 --attack imprint
    python benchmarks/soak.py --rounds 100 --clients 10 --attack imprint --defense secagg

Flags it does not know go to `fl-sim run` as they are. The machine's other load shows in seconds per round.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def children() -> dict[int, list[int]]:
    """Every process's children, read from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, at any depth."""
    tree, found, todo = children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def open_files(pid: int) -> int:
    """Open file handles of a process (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_workers(server: int) -> list[int]:
    """The Ray worker processes below the server (their command line starts `ray::`, or is Ray's default_worker)."""
    return [pid for pid in descendants(server)
            if command_line(pid).startswith("ray::") or "default_worker.py" in command_line(pid)]


def finished_rounds(out: Path) -> list[dict]:
    try:
        lines = (out / "global.jsonl").read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a row being written
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--attack", default="imprint")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--defense", default="none")
    parser.add_argument("--every", type=int, default=50, help="rounds between samples (default 50)")
    parser.add_argument("--baseline", type=int, default=50, help="the sample growth is counted from (default 50)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    args, extra = parser.parse_known_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-")) / "run"
    command = [sys.executable, "-m", "fl_sim", "run", "--dataset", args.dataset, "--model", args.model,
               "--num-clients", str(args.clients), "--rounds", str(args.rounds), "--attack", args.attack,
               "--defense", args.defense, "--train-mode", "steps", "--local-steps", "1", "--batch-size", "8",
               "--seed", "0", "--out", str(out), *extra]
    print("$", " ".join(command[1:]), flush=True)
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 (open while the run writes to it)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    print(f"{'round':>5} {'s/round':>8} {'server MB':>10} {'workers MB':>11} {'workers':>8} {'server fds':>11} "
          f"{'workers fds':>12}", flush=True)
    samples: list[dict] = []
    next_sample, previous_elapsed, previous_round = args.every, 0.0, 0
    while server.poll() is None:
        rows = finished_rounds(out)
        if rows and len(rows) >= next_sample:
            row = rows[next_sample - 1]
            workers = ray_workers(server.pid)
            seconds = (row["elapsed_seconds"] - previous_elapsed) / (row["round"] - previous_round)
            sample = {"round": row["round"], "seconds_per_round": seconds,
                      "server_mb": rss_mb(server.pid), "workers_mb": sum(rss_mb(pid) for pid in workers),
                      "workers": len(workers), "server_fds": open_files(server.pid),
                      "workers_fds": sum(open_files(pid) for pid in workers)}
            samples.append(sample)
            previous_elapsed, previous_round = row["elapsed_seconds"], row["round"]
            print(f"{sample['round']:5d} {sample['seconds_per_round']:8.2f} {sample['server_mb']:10.0f} "
                  f"{sample['workers_mb']:11.0f} {sample['workers']:8d} {sample['server_fds']:11d} "
                  f"{sample['workers_fds']:12d}", flush=True)
            next_sample += args.every
            continue
        time.sleep(0.2)
    log.close()
    if server.returncode:
        raise SystemExit(f"fl-sim run failed ({server.returncode}); its output: {out.parent / (out.name + '.log')}")
    base = next((s for s in samples if s["round"] == args.baseline), samples[0] if samples else None)
    if base is None or base is samples[-1]:
        print("too few samples to measure growth")
        return
    last = samples[-1]
    print(f"from round {base['round']} to {last['round']}: server RSS "
          f"{100 * (last['server_mb'] / base['server_mb'] - 1):+.1f}%, seconds per round "
          f"{100 * (last['seconds_per_round'] / base['seconds_per_round'] - 1):+.1f}% "
          f"(range over samples {min(s['seconds_per_round'] for s in samples):.2f}-"
          f"{max(s['seconds_per_round'] for s in samples):.2f}), workers RSS "
          f"{100 * (last['workers_mb'] / max(base['workers_mb'], 1e-9) - 1):+.1f}%, server fds "
          f"{last['server_fds'] - base['server_fds']:+d}, Ray workers {last['workers'] - base['workers']:+d}")


if __name__ == "__main__":
    main()
