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
# Standard library only: both sides and the attacker import them without pulling in anything else.
CONTRACT = {"fl_sim.protocol", "fl_sim.run_config"}
# What clients may import of fl_sim: the contract and the shared data, models, partitions and updates.
SHARED = CONTRACT | {"fl_sim.data", "fl_sim.models", "fl_sim.partition", "fl_sim.updates", "fl_sim.accuracy"}
SERVER = {"fl_sim.strategy", "fl_sim.server_app", "fl_sim.validation", "fl_sim.evaluation", "fl_sim.resume"}


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
    saved = GRAPH["fl_sim.protocol"]
    GRAPH["fl_sim.protocol"] = saved | {"fl_sim.strategy"}
    try:
        with pytest.raises(AssertionError, match="import cycle"):
            test_the_module_graph_has_no_cycle()
    finally:
        GRAPH["fl_sim.protocol"] = saved


def test_the_attacker_imports_no_flower_no_clients_and_of_fl_sim_only_the_contract():
    for name, path in MODULES.items():
        if name.startswith("attacker"):
            assert "flwr" not in flower_or_torch_imports(path), name
            assert all(not target.startswith("clients") for target in GRAPH[name]), name
            assert {t for t in GRAPH[name] if t.startswith("fl_sim")} <= {"fl_sim", "fl_sim.protocol"}, name


def test_clients_import_only_the_shared_part_of_fl_sim():
    for name in MODULES:
        if name.startswith("clients"):
            server_side = {t for t in GRAPH[name] if t.startswith("fl_sim") and t not in SHARED | {"fl_sim"}}
            assert not server_side, f"{name} imports server modules {server_side}"
            assert not any(t.startswith("attacker") for t in GRAPH[name]), name


def reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_no_server_module_reaches_the_clients_and_only_the_simulation_launcher_imports_the_client_app():
    for name in SERVER:
        assert not any(t.startswith("clients") for t in reachable(name)), f"{name} reaches the clients"
    # fl_sim.run starts a Flower simulation, both sides in one process; fl_sim.attack trains victims without Flower
    assert {name for name in MODULES if "clients.app" in GRAPH[name]} == {"fl_sim.run"}


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
    loaded = loaded_after(f"from fl_sim import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass")
    assert not loaded & {"torch", "flwr"}, loaded & {"torch", "flwr"}


def test_the_light_check_sees_a_heavy_import():
    assert {"torch"} <= loaded_after("from fl_sim import cli\ntry:\n    cli.main(['run', '--help'])\nexcept SystemExit:\n"
                                     "    pass\nimport fl_sim.models")


def test_python_dash_m_fl_sim_is_the_command():
    result = subprocess.run([sys.executable, "-m", "fl_sim", "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0 and "report" in result.stdout and "deploy" in result.stdout
