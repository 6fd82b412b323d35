"""The package's shape: no import cycles between modules, every module importable on its
own, no module above 500 lines, JAX kept out of the config and the method settings, and
no branching on method names outside fmjax/methods/."""
import ast
import pathlib
import re
import subprocess
import sys

from helpers import ROOT

PACKAGE = pathlib.Path(ROOT) / "fmjax"
MAX_LINES = 500


def _modules():
    """{module name: path} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name, path, modules):
    """The package modules `name` imports, at top level or inside functions. `from P import X`
    counts as importing module P.X when X is a submodule, else P (the ancestor packages
    Python loads first are not counted: they never run code of `name`)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_the_module_graph_has_no_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_is_above_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_module_imports_on_its_own():
    """Each module imported first in a process of its own (the others not loaded yet);
    the config and the method settings without importing JAX."""
    script = """
import importlib, sys
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "fmjax" or m.startswith("fmjax.")]:
        del sys.modules[loaded]
    jax_before = "jax" in sys.modules
    try:
        importlib.import_module(name)
    except Exception as err:
        failures.append(f"{name}: {type(err).__name__}: {err}")
        continue
    light = name == "fmjax.config" or name.endswith(".settings") or name in ("fmjax.errors", "fmjax.methods.registry")
    if light and not jax_before and "jax" in sys.modules:
        failures.append(f"{name} imports jax")
print("\\n".join(failures))
"""
    names = sorted(_modules(), key=lambda n: (not (n == "fmjax.config" or n.endswith(".settings")), n))
    light = [n for n in names if n == "fmjax.config" or n.endswith(".settings") or n in ("fmjax.errors",
                                                                                       "fmjax.methods.registry")]
    rest = [n for n in names if n not in light and not n.startswith("fmjax.data.tfds.builders")]
    for group in (light, rest):
        result = subprocess.run([sys.executable, "-c", script, *group], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not result.stdout.strip(), result.stdout


def test_nothing_outside_methods_asks_which_method_it_is():
    pattern = re.compile(r"""method\s*(==|!=|in)\s*\(?["'](flow_mismatch|radar|recon)""")
    offenders = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py")
                 if "methods" not in path.relative_to(PACKAGE).parts
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
