"""Data flows one way (STYLE.md 1): the package import edges, read from the source, no module that
imports itself through others, and what the `tpcluster` command imports when it only talks to a gateway.

Static imports only (`import x`, `from x import y`, at any depth, functions included); the CLI
registry's module strings are deliberately not imports.
"""

import ast
import json
import pathlib
import subprocess
import sys
from collections import deque

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "actors", "clients")

# actors/ may import only clients.protocol from clients/. These drive a real gateway through the
# client, which is their job (demo and benchmark); nothing else may join them.
ACTORS_USING_THE_CLIENT = {
    "actors/commands/demo.py": {"clients.client"},
    "actors/bench/measure.py": {"clients.client"},
    "actors/bench/serving.py": {"clients.client", "clients.soak"},
    "actors/bench/step.py": {"clients.client"},
    "actors/bench/fronts.py": {"clients.client"},
    "actors/bench/failover.py": {"clients.client", "clients.errors"},
    "actors/bench/scale.py": {"clients.client", "clients.errors"},
}


def _module_of(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported(path: pathlib.Path) -> set[str]:
    """Every module (or module.name, for `from module import name`) that `path` imports."""
    package = _module_of(path)[:-1] if path.name != "__init__.py" else _module_of(path)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def edges(folder: str) -> list[tuple[str, str]]:
    """(file relative to the repository, imported name) for every .py file under `folder`."""
    return [(path.relative_to(ROOT).as_posix(), name)
            for path in sorted((ROOT / folder).rglob("*.py")) for name in sorted(imported(path))]


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_scanner_sees_imports_inside_functions_and_relative_ones():
    found = imported(ROOT / "actors" / "commands" / "serve.py")
    assert "actors.gateway.app.serve_forever" in found  # imported inside run()
    assert "clients.protocol.inference_pb2" in imported(ROOT / "clients" / "protocol" / "inference_pb2_grpc.py")


def test_clients_import_neither_cluster_nor_actors():
    assert [(f, n) for f, n in edges("clients") if _top(n) in ("cluster", "actors")] == []


def test_only_cluster_runtime_reaches_actors():
    assert [(f, n) for f, n in edges("cluster") if _top(n) == "actors" and f != "cluster/runtime.py"] == []


def test_cluster_imports_no_grpc_and_ray_only_in_runtime():
    assert [(f, n) for f, n in edges("cluster") if _top(n) == "grpc"] == []
    assert [(f, n) for f, n in edges("cluster") if _top(n) == "ray" and f != "cluster/runtime.py"] == []


def test_actors_take_only_the_protocol_from_clients():
    found: dict[str, set[str]] = {}
    for file, name in edges("actors"):
        if _top(name) == "clients" and not (name == "clients.protocol" or name.startswith("clients.protocol.")):
            found.setdefault(file, set()).add(".".join(name.split(".")[:2]))  # clients.client.Client -> clients.client
    assert found == ACTORS_USING_THE_CLIENT


def import_graph() -> dict[str, set[str]]:
    """Each module of PACKAGES (a package by its own name, for its __init__.py) -> the modules of
    PACKAGES it imports, at any depth (functions and `if TYPE_CHECKING:` included).

    `from pkg import name` is the module pkg.name when there is one, else pkg itself (its
    __init__.py, which may still be initialising: that is the import a cycle breaks). `import a.b`
    is a.b alone: the packages above it are initialised before any of their modules runs.
    """
    modules = {".".join(_module_of(path)): path for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py"))}

    def module(name: str) -> str | None:
        parent = name.rpartition(".")[0]
        return name if name in modules else parent if parent in modules else None

    return {name: {target for imported_name in imported(path) if (target := module(imported_name)) not in (None, name)}
            for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle, as a path back to its start, per group of modules that import each other (Tarjan's
    strongly connected components); [] when none do."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set(stack[stack.index(node):])
            del stack[stack.index(node):]
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_shortest_cycle(min(group), group, graph) for group in groups)


def _shortest_cycle(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start within `group` (breadth first)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt in group and nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is on no cycle within {sorted(group)}")


def test_the_cycle_finder_reports_each_cycle_as_a_path():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a", "b"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_resolves_names_to_modules():
    graph = import_graph()
    assert "cluster.trace.state" in graph["cluster.handle"]  # under `if TYPE_CHECKING:`
    assert "cluster.trace.neuron" in graph["cluster.trace.backends"]  # inside get_backend()
    assert "cluster.trace.artifact" in graph["cluster.runtime"]  # from cluster.trace import artifact: the module
    assert "cluster.trace" in graph["cluster.models.llama"]  # from cluster.trace import parallel_model_trace: the package
    assert not any(name.startswith("torch") for targets in graph.values() for name in targets)


def test_no_module_imports_itself_through_others():
    cycles = find_cycles(import_graph())
    assert cycles == [], ("modules that import each other (move what they share into a module that imports neither):\n"
                          + "\n".join(" -> ".join(cycle) for cycle in cycles))


CLI_PROBE = """
import contextlib, io, json, sys
from actors.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cluster", "ray", "actors", "clients"))}))
"""


def _probe(*argv: str) -> dict:
    """`actors.cli.main(argv)` in a fresh interpreter: exit code, output, and the modules it imported."""
    done = subprocess.run([sys.executable, "-c", CLI_PROBE, *argv], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _heavy(loaded: list[str]) -> list[str]:
    return [m for m in loaded if m.split(".")[0] in ("torch", "cluster", "ray")]


def test_top_level_help_lists_the_registry_and_imports_no_command():
    from actors.cli import COMMANDS

    result = _probe("--help")
    assert result["code"] == 0
    assert all(name in result["stdout"] for name in COMMANDS)
    assert [m for m in result["loaded"] if m.startswith(("actors.commands", "clients", "actors.bench"))] == []
    assert _heavy(result["loaded"]) == []


@pytest.mark.parametrize("command", ["models", "status", "health", "embed", "classify", "generate"])
def test_client_commands_import_no_torch_cluster_or_ray(command):
    result = _probe(command, "--help")
    assert result["code"] == 0 and f"usage: tpcluster {command}" in result["stdout"]
    assert _heavy(result["loaded"]) == []
    assert not any(m.startswith("actors.") and m != "actors.cli" for m in result["loaded"])


def test_the_tpcluster_script_runs_the_registry():
    script = pathlib.Path(sys.executable).parent / "tpcluster"
    if not script.exists():
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    for argv in (["--help"], ["status", "--help"]):
        done = subprocess.run([str(script), *argv], check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "usage: tpcluster" in done.stdout


def test_a_client_error_is_one_line_without_importing_the_cluster():
    result = _probe("health", "--target", "127.0.0.1:1", "--timeout", "5")  # nothing listens on port 1
    assert result["code"] == 1
    assert result["stderr"].startswith("tpcluster: error: ") and result["stderr"].count("\n") == 1
    assert _heavy(result["loaded"]) == []
