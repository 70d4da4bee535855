"""What the commands check and do so that no flag, file or signal ends in a traceback or a hang.

- Interrupts: `interruptible()` turns SIGINT and SIGTERM into `Interrupted`, which each command turns into one
  line ("interrupted after round N; continue with: ...") and exit code 130 (SIGINT) or 143 (SIGTERM).
- Resources: a client's CPU or GPU share the machine cannot give, `--device cuda` without CUDA, and a run
  whose models and replies would not fit into the memory the machine has free, are refused with the numbers
  before anything starts (Ray would otherwise wait forever for an actor it cannot place).
- Output folders: a command writes only into a folder that is new, empty or its own, never inside the data.

Every refusal is a ConfigError (one sentence, exit code 2).
"""
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from fl_sim.contract.setting import ConfigError

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The user (SIGINT, Ctrl-C) or the system (SIGTERM) asked the command to stop.

    A BaseException, as KeyboardInterrupt is, so no `except Exception` on the way (Flower's, Ray's) swallows it.
    `detail` says where the command stopped and how to continue; the command that knows sets it.
    """

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum)
        self.signum, self.detail = signum, detail
        # set by a command that leaves threads no one can stop (Flower's server thread waiting for clients that
        # are gone): the process then ends at once, with exit_code, instead of waiting for them forever
        self.end_process = False

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def message(self, command: str) -> str:
        detail = self.detail if self.detail.startswith(";") else " " + self.detail if self.detail else ""
        return f"fl-sim {command}: interrupted ({self.name}){detail}"


_STOPPING = threading.Event()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    if _STOPPING.is_set():  # a second signal while the first one's stop is under way: that stop goes on
        return
    _STOPPING.set()
    raise Interrupted(signum)


def stopping() -> bool:
    """Whether SIGINT or SIGTERM has asked the command to stop (under `interruptible`)."""
    return _STOPPING.is_set()


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread for the duration (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in INTERRUPT_SIGNALS}
    _STOPPING.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def as_interrupt(error: SystemExit) -> Interrupted | None:
    """Ray's driver replaces the SIGTERM handler with one that exits with code SIGTERM: that is an interrupt."""
    return Interrupted(signal.SIGTERM) if error.code == signal.SIGTERM else None


def exit_now(code: int) -> None:
    """Ends the process at once with `code`, when threads a library started would keep it alive (a Flower
    server thread waiting for clients that are gone). Everything written so far is committed or rewound."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- resources -------------------------------------------------------------------------------------------------

def cpu_cores() -> int:
    """The cores this process may use (its affinity, which containers and taskset narrow), as Ray counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_client_resources(client_cpus: float, client_gpus: float) -> None:
    """A client's share must fit the machine: Ray cannot place an actor that needs more, and Flower then waits
    for it forever ("ActorPool is empty")."""
    if not client_cpus > 0 or not client_gpus >= 0:
        raise ConfigError("--client-cpus must be positive and --client-gpus non-negative")
    cores = cpu_cores()
    if client_cpus > cores:
        raise ConfigError(f"--client-cpus {client_cpus:g}: this machine has {cores} CPU core(s), so no client "
                          f"could be placed; use at most {cores}")
    if client_gpus > 0:
        gpus = gpu_count()
        if client_gpus > gpus:
            have = "no CUDA GPU" if not gpus else f"{gpus} GPU(s)"
            raise ConfigError(f"--client-gpus {client_gpus:g}: this machine has {have}, so no client could be "
                              f"placed; use --client-gpus 0{'' if not gpus else f' to {gpus}'}")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str) -> None:
    """`--device cuda` (or cuda:N) on a machine without it, refused before any folder is made."""
    if not device.startswith("cuda"):
        return
    gpus = gpu_count()
    index = device.partition(":")[2]
    if not gpus:
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU; use --device cpu (or auto)")
    if index and (not index.isdigit() or int(index) >= gpus):
        raise ConfigError(f"--device {device}: this machine has {gpus} GPU(s), cuda:0 to cuda:{gpus - 1}")


RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` writes its address
RAY_ANSWER_SECONDS = 5.0


def check_ray_address(address: str, flag: str = "--ray-address") -> None:
    """A Ray cluster must answer at `address` (host:port, ray://host:port, or 'auto': the one `ray start --head`
    started on this machine). Ray itself would retry an address where nothing listens every 30 s, forever and
    without a word; here a TCP connection to its port is tried for a few seconds, and a refusal names it."""
    import socket

    target = address
    if address == "auto":
        try:
            target = RAY_CURRENT_CLUSTER.read_text().strip()
        except OSError:
            raise ConfigError(f"{flag} auto: no Ray cluster was started on this machine ({RAY_CURRENT_CLUSTER} "
                              f"is missing): start one with `ray start --head`, or leave {flag} out") from None
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{flag} {address!r} is not host:port (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_ANSWER_SECONDS):
            pass
    except OSError as error:
        reason = "nothing answered" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise ConfigError(f"{flag} {address}: no Ray cluster answers at {target} ({reason.lower()} within "
                          f"{RAY_ANSWER_SECONDS:.0f} s): start one there with `ray start --head`, or leave {flag} "
                          f"out to run Ray in this process") from None


def available_memory() -> int | None:
    """Bytes the machine can give without swapping (MemAvailable of /proc/meminfo), or less where the process's
    address space is limited (`ulimit -v`: what remains of RLIMIT_AS); None when unknown."""
    import resource

    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        free = None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        except (OSError, ValueError, StopIteration):
            used = 0
        free = max(0, limit - used) if free is None else min(free, max(0, limit - used))
    return free


def model_bytes(model_name: str, shape: tuple[int, int, int], classes: int, imprint_rows: int) -> int:
    """The bytes of one copy of the model's weights (parameters and buffers: what a reply carries), counted on
    torch's meta device, so even a model too large for the machine costs no memory to measure."""
    import torch

    from fl_sim.learning.models import build_model

    with torch.device("meta"):
        model = build_model(model_name, shape[0], shape[1], classes, imprint=imprint_rows)
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


# What a run costs besides its models (measured with /usr/bin/time -v and the processes' RSS, MNIST, LeNet):
SERVER_BASE = int(1.5 * 2**30)  # the command's process: Python, torch, Flower and the data sets, before a model
RAY_BASE = int(0.5 * 2**30)  # Ray's own processes (GCS, raylet, ...)
WORKER_BASE = int(0.7 * 2**30)  # one Ray worker: Python, torch and the ClientApp
# copies of the model the server holds at its peak: the global, armed and aggregated models, the attack's (its
# readout of the imprint block's gradient), the scoreboard's and RoundEnd's models, the checkpoint being written
# and Flower's serialised messages (measured: 27 copies in all, server and two workers, --imprint-bins 25000,
# MNIST)
SERVER_COPIES = 16
PRINT_ABOVE = 2 * 2**30  # estimates above this are printed


def run_memory(copy_bytes: int, clients: int, workers: int, summed: bool = False, ray: bool = True) -> int:
    """A rough figure of a run's peak memory, all its processes together: the server process's own cost and its
    copies of the model (SERVER_COPIES) and every client's reply (two copies each: the message and its tensors);
    with `ray`, Ray's processes and per client worker (Ray actor) its own cost and the model, its gradient, the
    optimiser's state, the received and the sent weights (five copies). `summed`: the replies are summed as they
    arrive (Flower's SecAgg+ through fl_sim/server/secagg.py's SummingGrid), so the server holds a sum and a few
    replies (int64: two copies each) and the messages under way, not every reply; each worker holds SecAgg+'s
    quantized vector and masks besides (measured at 1000 MNIST clients, a 102 MB model: a worker's anonymous
    memory peaked at 1.7 GB, about 10 copies over its own cost, counted as 12; the server's at about 35 copies,
    counted as 40)."""
    fixed = SERVER_BASE + ((RAY_BASE + WORKER_BASE * workers) if ray else 0)
    if summed:
        return fixed + copy_bytes * (40 + 2 * workers + 12 * workers)
    return fixed + copy_bytes * (SERVER_COPIES + 2 * clients + 5 * workers)


def check_memory(copy_bytes: int, clients: int, workers: int, lower: str, senders: str = "client(s)",
                 summed: bool = False, ray: bool = True) -> int:
    """Refuses a run whose processes, models and replies would not fit into the machine's free memory, with the
    figure and the flag (`lower`) that makes it smaller; `senders` names who sends the replies (clients,
    victims); `summed`, `ray`: see run_memory. Returns the estimate (bytes)."""
    need, free = run_memory(copy_bytes, clients, workers, summed, ray), available_memory()
    if free is not None and need > free:
        raise ConfigError(f"this needs about {need / 2**30:.1f} GiB ({clients} {senders}, {copy_bytes / 2**20:.0f} "
                          f"MiB per copy of the model, {need / copy_bytes:.0f} copies' worth with the processes' own "
                          f"cost) but the machine has {free / 2**30:.1f} GiB free: lower {lower}")
    return need


def say_memory(command: str, need: int) -> None:
    """Prints a run's memory estimate when it is above PRINT_ABOVE (2 GiB), with the memory free."""
    if need > PRINT_ABOVE:
        free = available_memory()
        print(f"fl-sim {command}: memory estimate about {need / 2**30:.1f} GiB at its peak"
              + (f" ({free / 2**30:.1f} GiB free)" if free is not None else ""), flush=True)


# --- output folders --------------------------------------------------------------------------------------------

def check_new_folder(out: str | os.PathLike, command: str, own: str) -> None:
    """A new output folder must be new or empty: `own` is the file that marks one of `command`'s folders (said
    in the message); a folder holding it is the command's to judge, anything else is not written into."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a file, not a folder")
    if not path.is_dir() or (path / own).exists():
        return
    entries = sorted(entry.name for entry in path.iterdir() if entry.name != ".fl-sim.lock")
    if entries:
        raise ConfigError(f"--out {str(path)!r} holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}"
                          f", which fl-sim {command} did not write (no {own}): choose a new or empty folder")


def check_outside_data(out: str | os.PathLike, data_root: str | None, flag: str = "--out") -> None:
    """An output inside the data folder would become part of it (an ImageFolder class of its own)."""
    from fl_sim.learning.data import resolve_data_root

    root = resolve_data_root(data_root).resolve()
    target = Path(out).resolve()
    if target == root or target.is_relative_to(root):
        raise ConfigError(f"{flag} {str(out)!r} lies inside the data folder {str(root)!r}: write outputs elsewhere")
