"""`fl-sim deploy`: the compose files against the topology they come from, and the local deployment end to end."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flwr
import pytest
import yaml
from flower_helpers import live_commands
from packaging.specifiers import SpecifierSet

from fl_sim.commands import cli, deploy, topology
from fl_sim.commands.config import ConfigError
from fl_sim.results.outputs import read_jsonl
from fl_sim.server.flower_private import daemon_flag_parsers

ROOT = Path(__file__).resolve().parents[1]
FLAGS_OF = daemon_flag_parsers()


def compose_file(variant: str) -> dict:
    return yaml.safe_load((ROOT / topology.COMPOSE_VARIANTS[variant]).read_text())


@pytest.mark.parametrize("variant", list(topology.COMPOSE_VARIANTS))
def test_committed_compose_files_are_what_the_topology_generates(variant, capsys):
    flags = ["deploy", "compose", "--supernodes", "2", "--variant", variant]
    assert cli.main(flags) == 0
    assert (ROOT / topology.COMPOSE_VARIANTS[variant]).read_text() == capsys.readouterr().out, (
        f"{topology.COMPOSE_VARIANTS[variant]} drifted from fl_sim/commands/topology.py: regenerate it with "
        f"`fl-sim {' '.join(flags)} > {topology.COMPOSE_VARIANTS[variant]}`")


def test_the_compose_demo_has_every_service_wired_to_its_peer():
    services = compose_file("base")["services"]
    assert set(services) == {"superlink", "superexec-serverapp", "supernode-1", "supernode-2",
                             "superexec-clientapp-1", "superexec-clientapp-2"}
    assert services["superlink"]["image"] == f"flwr/superlink:{flwr.__version__}"
    assert services["superlink"]["ports"] == ["9093:9093"]
    for k in (1, 2):
        node = services[f"supernode-{k}"]
        assert node["image"] == f"flwr/supernode:{flwr.__version__}"
        assert option(node["command"], "--node-config") == f"partition-id={k - 1} num-partitions=2"
        assert option(node["command"], "--superlink") == "superlink:9093"
        assert option(node["command"], "--isolation") == "process"
        exec_command = services[f"superexec-clientapp-{k}"]["command"]
        assert option(exec_command, "--runtime-api-address") == f"supernode-{k}:{option(node['command'], '--port')}"
    assert option(services["superexec-serverapp"]["command"], "--runtime-api-address") == "superlink:9093"
    assert option(services["superlink"]["command"], "--isolation") == "process"
    for name, service in services.items():
        if name.startswith("superexec"):
            assert service["image"] == topology.APP_IMAGE
            assert service["build"]["args"]["FLWR_VERSION"] == flwr.__version__
            assert (ROOT / service["build"]["dockerfile"]).is_file()
            assert any(volume.endswith(f":{topology.CONTAINER_DATA}:ro") for volume in service["volumes"])
    assert "outputs:/app/out" in services["superexec-serverapp"]["volumes"]
    dockerfile = (ROOT / topology.APP_DOCKERFILE).read_text()
    assert f"ARG FLWR_VERSION={flwr.__version__}" in dockerfile
    assert "FROM flwr/superexec:${FLWR_VERSION}" in dockerfile


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_images_follow_the_flwr_that_pyproject_installs():
    pyproject = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"flwr\[simulation\]([^"]*)"', pyproject).group(1)
    assert flwr.__version__ == topology.FLWR_VERSION
    assert flwr.__version__ in SpecifierSet(spec)


@pytest.mark.parametrize("variant", ["base", "tls"])
def test_every_command_parses_with_the_installed_flwr(variant):
    """Flags that flwr 1.41 renamed or removed (--fleet-api-address, --plugin-type, ...) fail here."""
    commands = {service: spec["command"] for service, spec in compose_file(variant)["services"].items()}
    tls = topology.Tls(topology.CONTAINER_CERTS) if variant == "tls" else None
    for component in topology.components(2, topology.compose_endpoints(2), tls):
        assert commands[component.name] == list(component.args)
        parsed = FLAGS_OF[component.executable]().parse_args(commands[component.name])
        assert parsed.insecure == (variant == "base")


def test_the_tls_override_secures_every_connection_and_the_gpu_one_reserves_a_gpu():
    services = compose_file("tls")["services"]
    assert set(services) == set(compose_file("base")["services"])
    for service in services.values():
        assert "--insecure" not in service["command"]
        assert "./docker/certs:/app/certs:ro" in service["volumes"]
    assert option(services["supernode-1"]["command"], "--root-certificates") == "/app/certs/ca.crt"
    assert option(services["superexec-serverapp"]["command"], "--root-certificates") == "/app/certs/ca.crt"
    assert option(services["superlink"]["command"], "--ssl-certfile") == "/app/certs/server.pem"
    header = (ROOT / topology.COMPOSE_VARIANTS["tls"]).read_text()
    assert "docker/certs.sh ./docker/certs localhost 127.0.0.1 superlink supernode-1 supernode-2" in header
    devices = compose_file("gpu")["services"]["superexec-serverapp"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_certs_script_makes_a_certificate_for_every_host(tmp_path):
    subprocess.run(["bash", str(deploy.CERTS_SCRIPT), str(tmp_path), "localhost", "127.0.0.1", "superlink"],
                   check=True, capture_output=True)
    names = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-ext",
                            "subjectAltName"], check=True, capture_output=True, text=True).stdout
    assert "DNS:localhost" in names and "IP Address:127.0.0.1" in names and "DNS:superlink" in names
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ca.crt", "server.key", "server.pem"]


def free_ports(count: int) -> int:
    """A first port such that it and the `count - 1` after it are free."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count < 65536 and all(port_free(first + k) for k in range(count)):
            return first
    raise RuntimeError("no run of free ports")


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def deploy_flags(shared_data, out, port, *extra):
    return ["deploy", "local", "--train-mode", "steps", "--batch-size", "1", "--model", "lenet",
            "--supernodes", "2", "--rounds", "1", "--dataset", "mnist", "--data-root",
            str(shared_data), "--iterations", "20", "--restarts", "1", "--seed", "3", "--port", str(port),
            "--out", str(out), *extra]


def test_bad_input_is_refused_before_any_process_starts(shared_data, tmp_path, capsys):
    port = free_ports(3)
    assert cli.main(deploy_flags(shared_data, tmp_path / "out", port) + ["--supernodes", "0"]) == 2
    assert "--supernodes must be at least 1" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 2))
        taken.listen()
        assert cli.main(deploy_flags(shared_data, tmp_path / "out", port)) == 2
    assert f"port {port + 2} (supernode-2) is already in use" in capsys.readouterr().err
    assert cli.main(deploy_flags(shared_data, tmp_path / "out", 65534)) == 2
    assert "would listen on port 65536" in capsys.readouterr().err
    assert cli.main(deploy_flags(tmp_path / "nowhere", tmp_path / "out", port)) == 2
    assert "mnist is not under" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="flower-superlink, flower-supernode, flower-superexec, flwr, "
                                          "flwr-serverapp, flwr-clientapp not found"):
        deploy.find_executables(str(tmp_path))


def processes_on(ports: range) -> list[str]:
    """Command lines of live processes that listen on or dial one of `ports` (zombies have none)."""
    pattern = re.compile("|".join(rf"(:|--port ){port}\b" for port in ports))
    return [command for _, command in live_commands()
            if ("flower-" in command or "flwr-" in command) and pattern.search(command)]


def launch(flags: list[str]) -> subprocess.Popen:
    """`fl-sim deploy` as a user starts it: its own process, one torch thread per process (2 shared cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # A shell that starts pytest in the background ignores SIGINT for it; give the launcher Ctrl-C back.
    return subprocess.Popen([sys.executable, "-m", "fl_sim.commands.cli", *flags], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_local_deployment_writes_one_attack_per_supernode_and_leaves_no_process(shared_data, tmp_path):
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    port, out = free_ports(3), tmp_path / "out"
    run = launch(deploy_flags(shared_data, out, port))
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output[-4000:]
    assert "fl-sim deploy local: 2 SuperNode(s), 1 round(s), 2 attacked update(s) (0 failed)" in output
    assert "7 processes started, all stopped" in output
    assert not processes_on(range(port, port + 3))
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject, "flwr run rewrote pyproject.toml"

    record = json.loads((out / "run.json").read_text())
    assert record["finished"] and record["config"]["num-clients"] == 2 and record["config"]["seed"] == 3
    assert record["config"]["data-root"] == str(shared_data.resolve())
    assert [row["round"] for row in read_jsonl(out / "global.jsonl")] == [1]
    rows = read_jsonl(out / "metrics.jsonl")
    assert sorted(row["client"] for row in rows) == [0, 1]
    for row in rows:
        assert row["status"] == "ok" and row["label_acc"] == 1.0, row
        folder = out / f"round-001/client-{row['client']:03d}"
        assert (folder / "truth.png").stat().st_size > 0 and (folder / "reconstruction.png").stat().st_size > 0
    assert "round-001/client-001/reconstruction.png" in (out / "gallery.html").read_text()
    logs = out / "deploy-logs"
    assert sorted(path.stem for path in logs.iterdir()) == sorted(
        ["flwr-run", *(c.name for c in topology.components(2, topology.local_endpoints(2, port)))])
    assert "attack round 1: 2 client(s)" in (logs / "flwr-run.log").read_text()  # the ServerApp's log, streamed


def test_a_deployment_that_fails_to_start_stops_what_it_started(shared_data, tmp_path, capsys):
    port = free_ports(3)
    assert cli.main(deploy_flags(shared_data, tmp_path / "out", port, "--startup-timeout", "0")) == 1
    assert f"superlink did not listen on 127.0.0.1:{port} in time" in capsys.readouterr().err
    assert not processes_on(range(port, port + 3))


def test_ctrl_c_during_a_tls_deployment_stops_every_process(shared_data, tmp_path):
    port = free_ports(3)
    run = launch(deploy_flags(shared_data, tmp_path / "out", port, "--tls", "--iterations", "100000"))
    try:
        lines = []
        for line in run.stdout:  # the SuperNodes reached the TLS SuperLink, and the flwr CLI listed them over TLS
            lines.append(line)
            if "SuperNode(s) online" in line:
                break
        assert "2 SuperNode(s) online" in "".join(lines), "".join(lines)[-4000:]
        deadline = time.monotonic() + 60
        while not any("flwr-clientapp" in command for command in processes_on(range(port, port + 3))):
            assert time.monotonic() < deadline, "no ClientApp started"
            time.sleep(0.5)
        run.send_signal(signal.SIGINT)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, output[-3000:]
    assert "interrupted (SIGINT); every process was stopped" in output
    assert not processes_on(range(port, port + 3))
    assert "https://127.0.0.1" in (tmp_path / "out" / "deploy-logs" / "superlink.log").read_text()
