"""The one description of fl-sim's deployment: which Flower processes run, with which flags.

A deployment is one SuperLink, one SuperExec that runs the malicious ServerApp against it, and N
SuperNodes, each with the partition it trains (`--node-config`) and its own SuperExec for the
ClientApp. `components` lists them; `fl-sim deploy local` starts them as processes on this machine
(fl_sim/commands/deploy.py) and `fl-sim deploy compose` writes them as docker-compose services, so the demo in
docker-compose.yml runs the very commands the tests run. Only the addresses differ: localhost ports
here, service names on the compose network there.

Flags are those of flwr 1.41: one `--host/--port` per server (the SuperLink serves its Fleet, Control
and Runtime APIs on it), `--isolation process` so the apps run in separate SuperExecs, and SuperExecs
that take ServerApp or ClientApp tasks by themselves from the API they poll (no plugin type).
"""
from dataclasses import dataclass

import yaml

FLWR_VERSION = "1.41.0"  # the flwr release the images are pinned to: the one pyproject.toml installs
SUPERLINK_PORT = 9093
SUPERNODE_PORT = 9094
APP_IMAGE = "fl-sim-superexec"
APP_DOCKERFILE = "docker/superexec.Dockerfile"
CONTAINER_HOME = "/app"  # WORKDIR and HOME of Flower's images (user app, uid 49999)
CONTAINER_DATA = f"{CONTAINER_HOME}/data"
CONTAINER_OUT = f"{CONTAINER_HOME}/out"
CONTAINER_CERTS = f"{CONTAINER_HOME}/certs"
HOST_DATA = "${FL_SIM_DATA:-../shared/data}"  # compose substitutes it from the environment
HOST_CERTS = "./docker/certs"  # where `docker/certs.sh` writes the compose demo's certificates
OUTPUTS_VOLUME = "outputs"
COMPOSE_VARIANTS = {
    "base": "docker-compose.yml",
    "tls": "docker-compose.tls.yml",
    "gpu": "docker-compose.gpu.yml",
}


@dataclass(frozen=True)
class Endpoint:
    """A server of the topology: the host it listens on, and the host the others dial."""

    bind_host: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Tls:
    """Certificate paths as the processes see them: the three files docker/certs.sh writes."""

    folder: str

    @property
    def ca(self) -> str:
        return f"{self.folder}/ca.crt"

    @property
    def cert(self) -> str:
        return f"{self.folder}/server.pem"

    @property
    def key(self) -> str:
        return f"{self.folder}/server.key"

    def dialing(self) -> tuple[str, ...]:
        """Flags of a process that connects to a TLS server: trust our CA."""
        return ("--root-certificates", self.ca)

    def serving(self) -> tuple[str, ...]:
        """Flags of a process that serves TLS."""
        return ("--ssl-ca-certfile", self.ca, "--ssl-certfile", self.cert, "--ssl-keyfile", self.key)


@dataclass(frozen=True)
class Component:
    """One process: a Flower executable and its flags, and what a container of it needs."""

    name: str
    executable: str
    args: tuple[str, ...]
    endpoint: Endpoint | None = None  # what it serves, if it is a server
    depends_on: tuple[str, ...] = ()
    runs_apps: bool = False  # a SuperExec: needs the project's image and the data
    writes_outputs: bool = False  # the ServerApp's SuperExec: the run's outputs are written where it runs


def supernode_name(number: int) -> str:
    """SuperNodes count from 1, and supernode-k trains partition k - 1 (client-(k-1) in the outputs)."""
    return f"supernode-{number}"


def local_endpoints(supernodes: int, port: int = SUPERLINK_PORT) -> dict[str, Endpoint]:
    """All on 127.0.0.1: the SuperLink on `port`, SuperNode k on port + k."""
    endpoints = {"superlink": Endpoint("127.0.0.1", "127.0.0.1", port)}
    for number in range(1, supernodes + 1):
        endpoints[supernode_name(number)] = Endpoint("127.0.0.1", "127.0.0.1", port + number)
    return endpoints


def compose_endpoints(supernodes: int) -> dict[str, Endpoint]:
    """One container each: every server listens on all its interfaces and is dialled by service name."""
    endpoints = {"superlink": Endpoint("0.0.0.0", "superlink", SUPERLINK_PORT)}
    for number in range(1, supernodes + 1):
        name = supernode_name(number)
        endpoints[name] = Endpoint("0.0.0.0", name, SUPERNODE_PORT)
    return endpoints


def components(supernodes: int, endpoints: dict[str, Endpoint], tls: Tls | None = None) -> list[Component]:
    """Every process of the deployment, in the order they start."""
    if supernodes < 1:
        raise ValueError(f"a federation needs at least one SuperNode, got {supernodes}")
    superlink = endpoints["superlink"]
    dialing = tls.dialing() if tls else ("--insecure",)
    serving = tls.serving() if tls else ("--insecure",)
    found = [Component(
        "superlink", "flower-superlink",
        (*serving, "--isolation", "process", "--host", superlink.bind_host, "--port", str(superlink.port),
         "--disable-runtime-dependency-installation"),  # the app's image already holds every dependency
        endpoint=superlink)]
    for number in range(1, supernodes + 1):
        node = endpoints[supernode_name(number)]
        # A SuperNode dials the SuperLink and serves the Runtime API its SuperExec polls.
        security = (*dialing, *serving) if tls else ("--insecure",)
        found.append(Component(
            supernode_name(number), "flower-supernode",
            (*security, "--superlink", superlink.address, "--isolation", "process",
             "--host", node.bind_host, "--port", str(node.port),
             "--node-config", f"partition-id={number - 1} num-partitions={supernodes}"),
            endpoint=node, depends_on=("superlink",)))
    found.append(Component(
        "superexec-serverapp", "flower-superexec", (*dialing, "--runtime-api-address", superlink.address),
        depends_on=("superlink",), runs_apps=True, writes_outputs=True))
    for number in range(1, supernodes + 1):
        found.append(Component(
            f"superexec-clientapp-{number}", "flower-superexec",
            (*dialing, "--runtime-api-address", endpoints[supernode_name(number)].address),
            depends_on=(supernode_name(number),), runs_apps=True))
    return found


def certificate_hosts(endpoints: dict[str, Endpoint]) -> list[str]:
    """Names the server certificate must hold: every host dialled, and localhost for the flwr CLI."""
    hosts = ["localhost", "127.0.0.1"]
    for endpoint in endpoints.values():
        if endpoint.host not in hosts:
            hosts.append(endpoint.host)
    return hosts


def connection(address: str, tls: Tls | None = None) -> dict:
    """The flwr CLI's SuperLink connection (a `[superlink.<name>]` table of FLWR_HOME/config.toml)."""
    return {"address": address, "insecure": True} if tls is None else {"address": address, "root-certificates": tls.ca}


def _image(component: Component) -> str:
    if component.runs_apps:
        return APP_IMAGE
    return f"flwr/{component.executable.removeprefix('flower-')}:{FLWR_VERSION}"


def _service(component: Component) -> dict[str, object]:
    service: dict[str, object] = {"image": _image(component)}
    if component.runs_apps:  # the ServerApp and ClientApp code and dependencies, on flwr/superexec
        service["build"] = {"context": ".", "dockerfile": APP_DOCKERFILE, "args": {"FLWR_VERSION": FLWR_VERSION}}
    service["command"] = list(component.args)
    if component.name == "superlink" and component.endpoint:  # the flwr CLI on the host submits runs here
        service["ports"] = [f"{component.endpoint.port}:{component.endpoint.port}"]
    if component.runs_apps:
        service["environment"] = {"FL_SIM_DATA": CONTAINER_DATA}
        volumes = [f"{HOST_DATA}:{CONTAINER_DATA}:ro"]
        if component.writes_outputs:
            volumes.append(f"{OUTPUTS_VOLUME}:{CONTAINER_OUT}")
        service["volumes"] = volumes
    if component.depends_on:
        service["depends_on"] = list(component.depends_on)
    return service


def compose(supernodes: int, variant: str = "base") -> tuple[str, dict]:
    """(header comment, document) of docker-compose.yml or one of its override files."""
    if variant not in COMPOSE_VARIANTS:
        raise ValueError(f"unknown compose variant {variant!r}: choose one of {', '.join(COMPOSE_VARIANTS)}")
    endpoints = compose_endpoints(supernodes)
    command = f"fl-sim deploy compose --supernodes {supernodes}"
    if variant != "base":
        command += f" --variant {variant}"
    header = [f"# Generated by `{command} > {COMPOSE_VARIANTS[variant]}` from fl_sim/commands/topology.py:",
              "# edit that and regenerate (tests/test_deploy.py checks the two agree)."]
    if variant == "base":
        services = {c.name: _service(c) for c in components(supernodes, endpoints)}
        return "\n".join(header), {"services": services, "volumes": {OUTPUTS_VOLUME: {}}}
    if variant == "tls":
        hosts = " ".join(certificate_hosts(endpoints))
        header += ["# TLS for every connection. Certificates first, then both files:",
                   f"#   docker/certs.sh {HOST_CERTS} {hosts}",
                   f"#   docker compose -f {COMPOSE_VARIANTS['base']} -f {COMPOSE_VARIANTS['tls']} up --build"]
        tls = Tls(CONTAINER_CERTS)
        services = {c.name: {"command": list(c.args), "volumes": [f"{HOST_CERTS}:{CONTAINER_CERTS}:ro"]}
                    for c in components(supernodes, endpoints, tls)}
        return "\n".join(header), {"services": services}
    header += ["# The engine (the attack in the ServerApp) on an NVIDIA GPU; needs the NVIDIA Container Toolkit:",
               f"#   docker compose -f {COMPOSE_VARIANTS['base']} -f {COMPOSE_VARIANTS['gpu']} up --build"]
    gpu = {"deploy": {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}}
    return "\n".join(header), {"services": {"superexec-serverapp": gpu}}


def compose_text(supernodes: int, variant: str = "base") -> str:
    header, document = compose(supernodes, variant)
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=120)
    return f"{header}\n{body}"
