"""Where the seconds of a round go: one `fl-sim run` under py-spy, every Python process of it sampled, the samples
sorted into the round's parts.

It runs `py-spy record --subprocesses --format raw` on `fl-sim run` with the flags given after `--` (the server
process and every Python process it starts; Ray's own native processes, the raylet and the GCS, are not Python and
are not sampled) and one `py-spy record --pid` on each Ray actor worker (which run the ClientApps: Ray execs them,
and --subprocesses loses a process at its exec), then reads the collapsed stacks. py-spy samples only
threads that are running (not waiting), so a part's seconds are CPU seconds over all processes, not wall seconds.
Each sample goes to the part of its innermost frame that names one (the table `PARTS`, checked from the leaf
up): a NumPy call inside SecAgg+'s quantization is SecAgg+'s, a torch call inside the clients' local SGD is the
training's, a protobuf call anywhere is (de)serialisation.

    python benchmarks/round_profile.py --out DIR [--rate 25] [--raw DIR] -- FL-SIM RUN FLAGS

`--raw DIR` reads the profiles of an earlier run (DIR/profile.txt, DIR/worker-*.txt) instead of running one. With
`--case DATASET:MODEL:CLIENTS:IMAGES:STEPS` it also prints what one client receives and sends
(benchmarks/mosaic_overhead.py's count).
"""
import json
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import common

# (part, whose code it is, the frame's file path contains one of): innermost match wins
PARTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("the clients' training (local SGD)", "fl-sim", ("clients/training.py",)),
    ("data sets loaded, models built and loaded (server and clients)", "fl-sim",
     ("clients/app.py", "fl_sim/learning/data.py", "fl_sim/learning/models/", "fl_sim/learning/partition.py")),
    ("the block expanded from its distinct rows (clients)", "fl-sim",
     ("clients/transport.py", "learning/transport.py:unpack")),
    ("arming (the mosaic's block, the records sent)", "fl-sim",
     ("fl_sim/server/mosaic.py:arm", "fl_sim/server/active.py", "fl_sim/server/round.py:shared_record",
      "learning/transport.py", "fl_sim/server/strategy.py:configure_train", "mosaic.py:_logit_gradient",
      "mosaic.py:in_half")),
    ("the attack's readout", "fl-sim", ("attacker/", "fl_sim/server/attacks.py", "mosaic.py:read")),
    ("global accuracy, scoring, records, gallery", "fl-sim",
     ("fl_sim/learning/accuracy.py", "fl_sim/results/", "fl_sim/server/server_app.py", "fl_sim/server/auditor.py")),
    ("masked vectors summed as they arrive, the revealed aggregate read and aggregated", "fl-sim",
     ("fl_sim/server/secagg.py", "fl_sim/server/round.py", "fl_sim/learning/updates.py")),
    ("message (de)serialisation", "Flower", ("google/protobuf", "flwr/common/serde", "flwr/common/record/array",
                                             "flwr/common/parameter", "recorddict_compat", "numpy/lib/format.py",
                                             "flwr/proto/", "flwr/common/inflatable", "flwr/common/record/")),
    ("SecAgg+ on the clients (keys, shares, masks, quantization)", "Flower",
     ("flwr/client/mod/secure_aggregation",)),
    ("SecAgg+ on the server (the workflow's stages, unmasking)", "Flower",
     ("flwr/server/workflow/secure_aggregation",)),
    ("SecAgg+ cryptography and quantization (shared)", "Flower", ("flwr/common/secure_aggregation",
                                                                 "cryptography/")),
    ("Flower's simulation and messaging (Ray actors, the grid)", "Flower / Ray",
     ("flwr/simulation", "flwr/server/", "flwr/client/", "flwr/clientapp", "flwr/serverapp", "flwr/supercore",
      "flwr/superlink", "flwr/supernode", "flwr/common/", "ray/", "grpc/")),
    ("imports and start-up", "", ("<frozen importlib", "<frozen site>")),
)
OTHER = ("other", "")
COMPUTE = ("forward", "_call_impl", "_wrapped_call_impl")
NATIVE = ("a thread with no Python frame (native code)", "")
FRAME = re.compile(r"(?:^|;)([^;]+?) \(([^;()]+):(\d+)\)(?=;|$)")
PROCESS = re.compile(r'process (\d+):"')
WORKER = "Ray workers (the ClientApps)"
KINDS = (("default_worker.py", WORKER), ("fl-sim run", "the fl-sim run process (the server)"),
         ("dashboard/agent.py", "Ray's dashboard agent"), ("runtime_env/agent", "Ray's runtime-env agent"),
         ("log_monitor.py", "Ray's log monitor"))


def part_of(frames: list[tuple[str, str]]) -> tuple[str, str]:
    """The part (and whose code) of one sample, from its (function, file) frames, outermost first: its innermost
    frame that names a part."""
    if not frames:
        return NATIVE
    for func, path in reversed(frames):
        if func.rsplit(".", 1)[-1] in COMPUTE:
            continue  # a model's computation belongs to whoever runs it (training, evaluation, arming)
        where = f"{path}:{func}"
        for name, owner, needles in PARTS:
            if any(needle in where for needle in needles):
                return name, owner
    return OTHER


def process_kind(command: str) -> str:
    """Which process of the run a command line is."""
    return next((kind for needle, kind in KINDS if needle in command), "other processes")


def read_raw(path: Path, worker: bool = False) -> tuple[Counter, Counter]:
    """Samples by (part, whose code, process), and by process, from py-spy's raw (collapsed) output: one sample
    stack a line (with --subprocesses its process chain first, `process PID:"command line"`), its frames
    (`function (file:line)`), then a count. `worker`: a profile of one Ray worker (`--pid`), whose lines name no
    process."""
    parts: Counter = Counter()
    processes: Counter = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not (worker or stack.startswith("process ")):
            continue  # a command line's continuation (a newline inside it)
        starts = [found.end() for found in PROCESS.finditer(stack)]
        last = stack[starts[-1]:] if starts else stack
        frames = [(found[1], found[2]) for found in FRAME.finditer(last)]
        if worker and any("ray/dashboard/" in path or "runtime_env/agent" in path for _, path in frames):
            continue  # one of Ray's agents, sampled by the --subprocesses profile already
        process = WORKER if worker else process_kind(last.split('";', 1)[0] if frames else last)
        parts[(*part_of(frames), process)] += int(count)
        processes[process] += int(count)
    return parts, processes


def descends(pid: int, root: int) -> bool:
    """Whether process `pid` is `root` or below it."""
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")  # Ray's helpers: the --subprocesses profile's


def actor_workers(root: int) -> list[int]:
    """The Ray workers below `root` (process titles `ray::IDLE`, `ray::ClientAppActor...`), not Ray's agents."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::") and not title.startswith(RAY_AGENTS) and descends(int(entry.name), root):
            found.append(int(entry.name))
    return found


def profile_run(command: list[str], out: Path, rate: int) -> subprocess.CompletedProcess:
    """`command` under py-spy (every Python process it starts), and each Ray actor worker under a py-spy of its own
    from when it takes its actor's title: Ray starts an actor's worker through `setup_worker.py`, which execs the
    worker, and py-spy's --subprocesses follows the process only up to that exec."""
    log = (out / "stderr.txt").open("w")  # the run's log (Flower's stages, /usr/bin/time's figures)
    main = subprocess.Popen(["py-spy", "record", "--subprocesses", "--format", "raw", "--rate", str(rate), "-o",
                             str(out / "profile.txt"), "--", *command], stdout=subprocess.DEVNULL, stderr=log)
    watchers: dict[int, subprocess.Popen] = {}
    while main.poll() is None:
        for pid in actor_workers(main.pid):
            if pid not in watchers:
                watchers[pid] = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate",
                                                  str(rate), "-o", str(out / f"worker-{pid}.txt")],
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    log.close()
    for watcher in watchers.values():
        try:
            watcher.wait(timeout=60)  # each ends with its worker, which Ray stops with the run
        except subprocess.TimeoutExpired:
            watcher.terminate()
            watcher.wait()
    return subprocess.CompletedProcess(command, main.returncode, "", (out / "stderr.txt").read_text(errors="replace"))


# the round's phases in wall-clock seconds, each ended by the first log line that matches (a one-round run)
PHASES = (("Ray and the simulation started, the ServerApp's checks", r"\[INIT\]"),
          ("the initial global model evaluated (server)", r"\[ROUND 1\]"),
          ("sampling, arming, the instructions built", r"\[Stage 0\] Sending"),
          ("SecAgg+ stage 0: setup, public keys", r"\[Stage 0\] Received"),
          ("SecAgg+ stage 1: encrypted key shares", r"\[Stage 1\] Received"),
          ("SecAgg+ stage 2: the clients train, masked vectors", r"\[Stage 2\] Received"),
          ("SecAgg+ stage 3: unmasking", r"\[Stage 3\] Received"),
          ("the aggregate read by the attack, scored, aggregated", r"Secure aggregation completed"),
          ("the round's end (global accuracy, gallery, checkpoint)", r"fit progress"),
          ("shutdown", r"$^"))


def phases(log: str) -> list[tuple[str, float]]:
    """Wall-clock seconds of each of `PHASES`, from the timestamps of the server's log lines."""
    stamped = []
    for line in log.splitlines():
        found = re.match(r"(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d):", line)
        if found and "ClientAppActor" not in line:
            stamped.append((datetime.strptime(found[1], "%m/%d/%Y %H:%M:%S"), line))
    if not stamped:
        return []
    done, start, index = [], stamped[0][0], 0
    for name, pattern in PHASES:
        while index < len(stamped) and not re.search(pattern, stamped[index][1]):
            index += 1
        end = stamped[min(index, len(stamped) - 1)][0]
        done.append((name, (end - start).total_seconds()))
        start = end
    return done


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--out", required=True, help="folder for the run and its profile")
    parser.add_argument("--rate", type=int, default=25, help="py-spy samples a second")
    parser.add_argument("--raw", help="read the profiles an earlier run wrote in this folder instead of running one")
    parser.add_argument("--case", help="DATASET:MODEL:CLIENTS:IMAGES:STEPS: also print a client's bytes")
    common.add_data_root(parser)
    args, flags = parser.parse_known_args()
    flags = [flag for flag in flags if flag != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.raw:
        if not flags:
            parser.error("give the fl-sim run flags after --, or --raw FOLDER")
        command = ["/usr/bin/time", "-v", str(Path(sys.executable).parent / "fl-sim"), "run", "--out",
                   str(out / "run"), *flags]
        print("$", " ".join(command), flush=True)
        done = profile_run(command, out, args.rate)
        if done.returncode:
            raise SystemExit(f"the profiled run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", done.stderr)
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        print(f"wall clock {wall[1] if wall else '?'}, peak RSS {int(peak[1]) / 1e6 if peak else float('nan'):.2f} GB")
    folder = Path(args.raw) if args.raw else out
    if (folder / "stderr.txt").exists():
        timed = phases((folder / "stderr.txt").read_text(errors="replace"))
        print("\n| phase of the run (the server's log) | wall seconds |\n|---|---:|")
        for name, seconds in timed:
            print(f"| {name} | {seconds:.0f} |")
    parts, processes = read_raw(folder / "profile.txt")
    for worker in sorted(folder.glob("worker-*.txt")):
        more, of = read_raw(worker, worker=True)
        parts.update(more)
        processes.update(of)
    total = sum(parts.values())
    if not total:
        raise SystemExit(f"{folder}: no samples")
    server, other = "the fl-sim run process (the server)", "other processes"
    by_part: dict[tuple[str, str], Counter] = {}
    for (name, owner, process), samples in parts.items():
        column = process if process in (server, WORKER) else other
        by_part.setdefault((name, owner), Counter())[column] += samples
    print("\n| part of the round | whose code | server | Ray workers (ClientApps) | Ray's other processes "
          "| CPU seconds | share |\n|---|---|---:|---:|---:|---:|---:|")
    for (name, owner), columns in sorted(by_part.items(), key=lambda item: -item[1].total()):
        cells = " | ".join(f"{columns[column] / args.rate:,.1f}" for column in (server, WORKER, other))
        print(f"| {name} | {owner} | {cells} | {columns.total() / args.rate:,.1f} | {columns.total() / total:.1%} |")
    print(f"| all sampled | | {processes[server] / args.rate:,.1f} | {processes[WORKER] / args.rate:,.1f} | "
          f"{(total - processes[server] - processes[WORKER]) / args.rate:,.1f} | {total / args.rate:,.1f} | 100% |")
    print("\n| process | CPU seconds | share |\n|---|---:|---:|")
    for process, samples in processes.most_common():
        print(f"| {process} | {samples / args.rate:,.0f} | {samples / total:.1%} |")
    if args.case:
        import mosaic_overhead

        figures = mosaic_overhead.mosaic(args.case, args.data_root, 0)
        print(f"\nA client of {args.case} receives {figures['received_bytes'] / 1e6:.2f} MB "
              f"({figures['distinct_bytes'] / 1e6:.2f} MB with the block as its distinct rows) and sends "
              f"{figures['reply_secagg_bytes'] / 1e6:.1f} MB through SecAgg+ (one int64 an entry)")
        (out / "bytes.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
