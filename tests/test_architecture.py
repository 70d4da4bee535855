"""The shape of the program: who may import whom (docs/architecture.md), and light sub-commands.

The import graph is read from the source (every `import` and `from ... import`, also inside functions),
so a late import cannot hide an edge.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attacker", "clients", "fl_sim")
# The layers, as packages: what each may import of the project (besides itself). docs/architecture.md draws them.
LAYERS = {
    "fl_sim.contract": set(),  # standard library only
    "fl_sim.learning": {"fl_sim.contract"},
    "attacker": {"fl_sim.contract"},  # pure torch: no Flower, no clients, no ground truth
    "clients": {"fl_sim.contract", "fl_sim.learning"},
    "fl_sim.results": {"fl_sim.contract", "attacker"},
    "fl_sim.server": {"fl_sim.contract", "fl_sim.learning", "fl_sim.results", "attacker"},
    "fl_sim.commands": {"fl_sim.contract", "fl_sim.learning", "fl_sim.results", "fl_sim.server", "attacker",
                        "clients"},
    "fl_sim.__main__": {"fl_sim.commands"},
    # the package's face as a library (fl_sim.malicious, fl_sim.disclose), imported lazily
    "fl_sim": {"fl_sim.server", "clients"},
}
CONTRACT = {"fl_sim.contract.protocol", "fl_sim.contract.run_config", "fl_sim.contract.records",
            "fl_sim.contract.attacks", "fl_sim.contract.setting", "fl_sim.contract.names", "fl_sim.contract.faults",
            "fl_sim.contract.defenses", "fl_sim.contract.models", "fl_sim.contract.presets",
            "fl_sim.contract.detectors"}


def layer_of(module: str) -> str:
    """The package (layer) a module belongs to: `fl_sim.server.strategy` -> `fl_sim.server`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fl_sim" and len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every project module `path` imports (resolved to modules that exist, packages mapped to their __init__)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


MODULES = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def flower_or_torch_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
    return names & {"flwr", "torch", "torchvision", "numpy"}


def test_the_module_graph_has_no_cycle():
    state = {}

    def visit(name, trail):
        if state.get(name) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(name):] + [name])}")
        if state.get(name) == "done":
            return
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(GRAPH):
        visit(name, [])


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: a graph with an edge back is refused."""
    saved = GRAPH["fl_sim.contract.protocol"]
    GRAPH["fl_sim.contract.protocol"] = saved | {"fl_sim.server.strategy"}
    try:
        with pytest.raises(AssertionError, match="import cycle"):
            test_the_module_graph_has_no_cycle()
    finally:
        GRAPH["fl_sim.contract.protocol"] = saved


def layer_violations(graph) -> list[str]:
    found = []
    for name, targets in graph.items():
        layer = layer_of(name)
        assert layer in LAYERS, f"{name} is in no layer: add its package to LAYERS"
        for target in targets:
            if target != "fl_sim" and layer_of(target) != layer and layer_of(target) not in LAYERS.get(layer, set()):
                found.append(f"{name} -> {target}")
    return found


def test_every_import_follows_the_package_layers():
    assert not layer_violations(GRAPH)


def test_the_layer_check_finds_a_wrong_arrow():
    """The check above can fail: the server importing a command is refused."""
    graph = {**GRAPH, "fl_sim.server.strategy": GRAPH["fl_sim.server.strategy"] | {"fl_sim.commands.config"}}
    assert layer_violations(graph) == ["fl_sim.server.strategy -> fl_sim.commands.config"]


def test_the_attacker_imports_no_flower():
    for name, path in MODULES.items():
        if name.startswith("attacker"):
            assert "flwr" not in flower_or_torch_imports(path), name


def reachable(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_no_server_module_reaches_the_clients_and_only_the_simulation_launcher_imports_the_client_app():
    for name in (name for name in MODULES if layer_of(name) == "fl_sim.server"):
        assert not any(t.startswith("clients") for t in reachable(name)), f"{name} reaches the clients"
    # fl_sim.commands.run starts a Flower simulation, both sides in one process; fl_sim.commands.attack trains
    # victims without Flower
    assert {name for name in MODULES if "clients.app" in GRAPH[name]} == {"fl_sim.commands.run"}


def test_the_contract_imports_only_the_standard_library():
    for name in CONTRACT:
        assert not flower_or_torch_imports(MODULES[name]), name
        assert GRAPH[name] <= CONTRACT | {"fl_sim"}, name


def loaded_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running `code`."""
    script = f"import sys\n{code}\nprint('LOADED', *sorted({{m.split('.')[0] for m in sys.modules}}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.rpartition("LOADED")[2].split())


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["deploy", "compose", "--supernodes", "2"]])
def test_light_sub_commands_import_neither_torch_nor_flower(argv):
    loaded = loaded_after(f"from fl_sim.commands import cli\ntry:\n    cli.main({argv!r})\n"
                          "except SystemExit:\n    pass")
    assert not loaded & {"torch", "flwr"}, loaded & {"torch", "flwr"}


def test_the_light_check_sees_a_heavy_import():
    assert {"torch"} <= loaded_after("from fl_sim.commands import cli\ntry:\n    cli.main(['run', '--help'])\n"
                                     "except SystemExit:\n"
                                     "    pass\nimport fl_sim.learning.models")


def test_python_dash_m_fl_sim_is_the_command():
    result = subprocess.run([sys.executable, "-m", "fl_sim", "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0 and "report" in result.stdout and "deploy" in result.stdout


def test_the_architecture_doc_names_every_module():
    """docs/architecture.md's module table names each module: by its path, or by its file name in a row that
    names its folder (`fl_sim/learning/models/` (`cnn.py`, ...))."""
    table = (ROOT / "docs" / "architecture.md").read_text().split("## The modules")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    missing = []
    for path in MODULES.values():
        relative = path.relative_to(ROOT)
        if path.name == "__init__.py":
            continue  # a package's docstring says what it holds
        folder = relative.parent.as_posix()
        if not any(f"`{relative}`" in row or (f"`{folder}/" in row and f"`{path.name}`" in row) for row in rows):
            missing.append(str(relative))
    assert not missing, f"docs/architecture.md does not name {missing}"
