"""`fl-sim deploy`: the federation as real Flower processes instead of a simulation.

`fl-sim deploy local` starts the topology of fl_sim/commands/topology.py on this machine: the SuperLink, the
SuperNodes and a SuperExec beside each, every one a process group of its own on a localhost port.
It waits until every SuperNode is online, submits this project with `flwr run` to that SuperLink
(through a connection in a private FLWR_HOME, so neither ~/.flwr nor pyproject.toml is touched), and
stops every process however the run ends: finished, failed, Ctrl-C or SIGTERM. OUT then holds what
`fl-sim run` writes, plus OUT/deploy-logs/ with each process's output (flwr-run.log: the ServerApp's, streamed).

`fl-sim deploy compose` prints the same topology as docker-compose services (docker-compose.yml and
its TLS and GPU override files are its output).
"""
import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w

from fl_sim.commands import config, guard, topology
from fl_sim.commands.run import config_from_flags, headline, summary
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError, Group

ROOT = Path(__file__).resolve().parents[2]  # the Flower app `flwr run` submits: this project's checkout
CERTS_SCRIPT = ROOT / "docker" / "certs.sh"
CONNECTION = "fl-sim-deploy"  # the flwr CLI's name for the SuperLink started here
EXECUTABLES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "flwr-serverapp", "flwr-clientapp")
DEFAULTS = RunConfig()


class DeployError(RuntimeError):
    """The deployment broke after it started; the message names the process and its log."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="mode", required=True)
    local = modes.add_parser("local", help="run the deployment as processes on this machine",
                             description="SuperLink, SuperNodes and SuperExecs as local processes; the app "
                                         "runs with `flwr run`; every process is stopped at the end")
    config.add_task_arguments(local, defaults=DEFAULTS)
    fed = local.add_argument_group(Group.FEDERATION.value)
    fed.add_argument("--supernodes", type=int, default=2, help="SuperNodes, one per partition (default 2)")
    config.add_settings(fed, Group.FEDERATION, DEFAULTS,
                        only=("rounds", "partition", "alpha", "attack_every", "attack_clients", "client_eval"))
    dep = local.add_argument_group("deployment")
    dep.add_argument("--port", type=int, default=topology.SUPERLINK_PORT,
                     help=f"the SuperLink's port; SuperNode k listens on port + k (default {topology.SUPERLINK_PORT})")
    dep.add_argument("--tls", action="store_true",
                     help="TLS on every connection, with throwaway certificates from docker/certs.sh")
    dep.add_argument("--startup-timeout", type=float, default=120.0,
                     help="seconds to wait for the servers and SuperNodes to come up (default 120)")
    dep.add_argument("--timeout", type=float, default=None, help="stop everything if the run takes longer (seconds)")

    compose = modes.add_parser("compose", help="print the deployment as docker-compose services",
                               description="the same topology as docker-compose.yml (or one of its override files)")
    compose.add_argument("--supernodes", type=int, default=2, help="SuperNodes (default 2)")
    compose.add_argument("--variant", default="base", choices=topology.COMPOSE_VARIANTS,
                         help="base: docker-compose.yml; tls / gpu: its override files")


def main(args) -> int:
    if args.mode == "compose":
        if args.supernodes < 1:
            raise ConfigError(f"--supernodes must be at least 1, got {args.supernodes}")
        sys.stdout.write(topology.compose_text(args.supernodes, args.variant))
        return 0
    try:
        result = deploy_local(args)
    except DeployError as error:
        print(f"fl-sim deploy: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, guard.Interrupted) as interrupt:  # deploy_local has stopped every process
        if isinstance(interrupt, KeyboardInterrupt):
            print("fl-sim deploy: interrupted; every process was stopped", file=sys.stderr)
            return 130
        interrupt.detail = "; every process was stopped"
        raise
    psnr, accuracy = headline(result)
    print(f"fl-sim deploy local: {args.supernodes} SuperNode(s), {result['rounds']} round(s), "
          f"{result['attacked']} attacked update(s) ({result['failed']} failed), PSNR median {psnr}, "
          f"final global accuracy {accuracy}, {result['seconds']:.1f} s -> {args.out}; "
          f"{result['processes']} processes started, all stopped")
    return 0


def checked_config(args) -> RunConfig:
    """The run config the app gets, with absolute paths (the apps run elsewhere), checked with its data."""
    from fl_sim.learning.data import (  # imported late: torch and flwr are slow to import
        cached_dataset,
        resolve_data_root,
    )
    from fl_sim.server.server_app import preflight

    if args.supernodes < 1:
        raise ConfigError(f"--supernodes must be at least 1, got {args.supernodes}")
    run_config = config_from_flags(args)
    run_config = dataclasses.replace(run_config, num_clients=args.supernodes, out=str(Path(args.out).resolve()),
                                     data_root=str(resolve_data_root(args.data_root).resolve()))
    preflight(run_config)  # config, data, partition sizes, and an OUT that holds no other run
    cached_dataset(run_config.dataset, run_config.data_root, False)
    return run_config


def find_executables(search_path: str) -> dict[str, str]:
    """Flower's commands on `search_path`; one error naming every one that is missing."""
    found = {name: shutil.which(name, path=search_path) for name in EXECUTABLES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ConfigError(f"Flower's {', '.join(missing)} not found beside {sys.executable} nor on PATH: "
                                 "install this project (pip install -e .), which brings flwr")
    return {name: path for name, path in found.items() if path is not None}


def check_ports(endpoints: dict[str, topology.Endpoint]) -> None:
    for name, endpoint in endpoints.items():
        if not 0 < endpoint.port < 65536:
            raise ConfigError(f"{name} would listen on port {endpoint.port}: --port must be from 1 to "
                                     f"{65535 - (len(endpoints) - 1)}")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves bind
            try:
                probe.bind((endpoint.bind_host, endpoint.port))
            except OSError:
                raise ConfigError(f"port {endpoint.port} ({name}) is already in use: choose another --port "
                                         "(the SuperLink's; SuperNode k takes port + k)") from None


def check_project() -> None:
    """`flwr run` bundles the app from its source folder, so fl-sim must run from its checkout."""
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(errors="replace"):
        raise ConfigError(f"{ROOT} is not this project's checkout (no pyproject.toml with [tool.flwr.app]): "
                                 "fl-sim deploy local submits the app from its source; pip install -e . it")


class Processes:
    """The processes a deployment started, each leading its own process group, and their teardown.

    A SuperExec's ServerApp and ClientApp processes stay in its group, so stopping the groups stops
    everything this deployment ran.
    """

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: dict, cwd: Path, echo: bool = False) -> subprocess.Popen:
        """Starts `command` with its output in log_dir/NAME.log, and also on ours if `echo`."""
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed below, or by the tee thread)
        try:
            process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        except BaseException:
            log.close()
            raise
        self.started.append((name, process))
        if echo:
            threading.Thread(target=_tee, args=(process.stdout, log), daemon=True).start()
        else:
            log.close()
        return process

    def check_alive(self, services: list[str]) -> None:
        for name, process in self.started:
            if name in services and process.poll() is not None:
                raise DeployError(f"{name} exited with status {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return "\n".join(f"  | {line}" for line in text) + f"\n  (whole log: {path})"

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM to every group, newest first; SIGKILL to what is left after `grace` seconds.

        Returns the pids still alive afterwards (none, unless a process escaped its group).
        """
        groups = [process.pid for _, process in reversed(self.started)]
        for group in groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        while any(group_members(group) for group in groups) and time.monotonic() < deadline:
            time.sleep(0.1)
        for group in groups:
            _signal_group(group, signal.SIGKILL)
        for _, process in self.started:
            process.wait()
        time.sleep(0.1)
        return [pid for group in groups for pid in group_members(group)]


def _tee(source, log) -> None:
    """Copies a process's output to ours and to its log as it comes (carriage returns of progress bars too)."""
    with source, log:
        while chunk := os.read(source.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
            log.flush()


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(entry.name))
    return members


def wait_listening(endpoint: topology.Endpoint, name: str, processes: Processes, deadline: float) -> None:
    while True:
        processes.check_alive([name])
        try:
            with socket.create_connection((endpoint.host, endpoint.port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise DeployError(f"{name} did not listen on {endpoint.address} in time:\n{processes.tail(name)}")
        time.sleep(0.2)


def flwr_json(flwr: str, arguments: list[str], env: dict) -> dict:
    """A `flwr ... --format json` answer of the CLI."""
    try:
        done = subprocess.run([flwr, *arguments, CONNECTION, "--format", "json"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout)
    except subprocess.TimeoutExpired:
        return {"success": False, "error": "no answer in 60 s"}
    except json.JSONDecodeError:
        return {"success": False, "error": (done.stdout + done.stderr).strip()[-500:]}


def wait_for_supernodes(flwr: str, env: dict, expected: int, processes: Processes, services: list[str],
                        deadline: float) -> None:
    """Until the SuperLink lists `expected` SuperNodes online (else the run would wait for them)."""
    while True:
        processes.check_alive(services)
        answer = flwr_json(flwr, ["supernode", "ls"], env)
        online = sum(node.get("status") == "online" for node in answer.get("nodes", []))
        if online == expected:
            return
        if time.monotonic() > deadline:
            raise DeployError(f"{online} of {expected} SuperNodes online after the startup timeout "
                              f"(last answer: {answer}); see the logs in {processes.log_dir}")
        time.sleep(1.0)


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def deploy_local(args) -> dict:
    """Starts the topology, runs the app on it, stops it; the run's summary (fl_sim/commands/run.py) plus process
    count."""
    run_config = checked_config(args)
    check_project()
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    executables = find_executables(search_path)
    endpoints = topology.local_endpoints(args.supernodes, args.port)
    check_ports(endpoints)
    if args.tls and not shutil.which("openssl"):
        raise ConfigError("--tls needs openssl to make the certificates, and it is not on PATH")

    out = Path(run_config.out)
    log_dir = out / "deploy-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fl-sim-deploy-"))
    base_env = {**os.environ, "PATH": search_path, "PYTHONUNBUFFERED": "1"}
    base_env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline by default, as fl-sim run
    base_env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    processes = Processes(log_dir)
    previous = {signum: signal.signal(signum, _raise_exit) for signum in (signal.SIGTERM, signal.SIGHUP)}
    started = time.perf_counter()
    try:
        tls = make_certificates(scratch / "certs", endpoints) if args.tls else None
        deadline = time.monotonic() + args.startup_timeout
        services = []
        for component in topology.components(args.supernodes, endpoints, tls):
            home = scratch / component.name  # each process its own FLWR_HOME, as on separate machines
            home.mkdir()
            processes.start(component.name, [executables[component.executable], *component.args],
                            {**base_env, "FLWR_HOME": str(home)}, home)
            services.append(component.name)
            if component.endpoint:
                wait_listening(component.endpoint, component.name, processes, deadline)
        cli_env = {**base_env, "FLWR_HOME": str(write_cli_config(scratch / "cli", endpoints["superlink"], tls))}
        wait_for_supernodes(executables["flwr"], cli_env, args.supernodes, processes, services, deadline)
        print(f"fl-sim deploy: SuperLink on {endpoints['superlink'].address}, {args.supernodes} SuperNode(s) online; "
              f"running the app (process logs in {log_dir})", flush=True)
        submit(executables["flwr"], cli_env, run_config, scratch, processes, services, args.timeout)
        result = {**summary(out, time.perf_counter() - started), "processes": len(processes.started)}
    finally:
        ignored = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            leftovers = processes.stop()
            shutil.rmtree(scratch, ignore_errors=True)
        finally:
            for signum, handler in {**ignored, **previous}.items():
                signal.signal(signum, handler)
        if leftovers:  # said even when another error is on its way out
            print(f"fl-sim deploy: processes {leftovers} survived the teardown; stop them by hand", file=sys.stderr)
    if leftovers:
        raise DeployError("the run finished, but not every process could be stopped")
    return result


def make_certificates(folder: Path, endpoints: dict[str, topology.Endpoint]) -> topology.Tls:
    done = subprocess.run(["bash", str(CERTS_SCRIPT), str(folder), *topology.certificate_hosts(endpoints)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise DeployError(f"{CERTS_SCRIPT} failed: {done.stderr.strip()}")
    return topology.Tls(str(folder))


def write_cli_config(home: Path, superlink: topology.Endpoint, tls: topology.Tls | None) -> Path:
    """A FLWR_HOME whose default connection is the SuperLink started here."""
    home.mkdir(parents=True)
    document = {"superlink": {"default": CONNECTION, CONNECTION: topology.connection(superlink.address, tls)}}
    (home / "config.toml").write_text(tomli_w.dumps(document))
    return home


def submit(flwr: str, env: dict, run_config: RunConfig, scratch: Path, processes: Processes, services: list[str],
           timeout: float | None) -> None:
    """`flwr run` of this project with `run_config`, streamed to our output; an error unless it completed."""
    overrides = scratch / "run-config.toml"  # a file: paths with spaces or quotes need no shell quoting
    overrides.write_text(tomli_w.dumps(run_config.to_flower()))
    run = processes.start("flwr-run", [flwr, "run", str(ROOT), CONNECTION, "--stream", "--run-config", str(overrides)],
                          env, ROOT, echo=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while run.poll() is None:
        processes.check_alive(services)
        if deadline is not None and time.monotonic() > deadline:
            raise DeployError(f"the run took longer than --timeout {timeout:g} s; see the logs in {processes.log_dir}")
        time.sleep(0.5)
    runs = flwr_json(flwr, ["ls"], env).get("runs", [])
    if not runs:
        raise DeployError(f"flwr run exited with status {run.returncode} before a run started:\n"
                          f"{processes.tail('flwr-run', 5)}\nthe SuperLink's log:\n{processes.tail('superlink')}")
    status = runs[0].get("status")
    if run.returncode != 0 or status != "finished:completed":
        raise DeployError(f"the run ended {status} ({runs[0].get('status-details')}); the ServerApp's log, "
                          f"as flwr run streamed it:\n{processes.tail('flwr-run')}")
