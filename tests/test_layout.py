"""The code's layout, as ../shared/DESIGN.md states it, checked on the source text."""
import inspect
import re
from pathlib import Path

from conftest import ROOT
from mtlref.adapters import REGISTRY

ISINSTANCE = re.compile(r"\b(?:isinstance|issubclass)\(((?:[^()]|\([^()]*\))*)\)")


def class_tests(path: Path, names: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, call) for every isinstance/issubclass in `path` that names one of `names` (adapter
    class name -> its own file) outside that class's own file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in ISINSTANCE.finditer(text)
            if any(re.search(rf"\b{name}\b", m.group(1)) and path.resolve() != home.resolve()
                   for name, home in names.items())]


def test_no_file_asks_which_adapter_class_it_holds():
    """A method's particulars live in its own file (mtlref/adapters/<method>.py): code elsewhere
    asks the adapter through the Adapter interface's hooks, never isinstance(x, MoRE)."""
    names = {cls.__name__: Path(inspect.getfile(cls)).resolve() for cls in REGISTRY.values()}
    assert set(names) == {"LoRA", "DoRA", "MultiLoRA", "MoELoRA", "MixLoRA", "MTLLoRA", "MoRE", "HydraLoRA", "MoSLoRA",
                          "Poly"}
    files = sorted((ROOT / "mtlref").rglob("*.py")) + sorted(ROOT.glob("*.py"))
    assert ROOT / "mtlref" / "export.py" in files and ROOT / "train.py" in files
    offenders = [f"{path.relative_to(ROOT)}:{line}: {call}"
                 for path in files for line, call in class_tests(path, names)]
    assert not offenders, ("these files test for a particular adapter class; give base.Adapter a hook the "
                           f"class implements instead: {offenders}")


def test_the_class_test_finder_finds_one(tmp_path):
    """The finder itself: a test for a class is found (also inside a tuple, over two lines),
    a longer name containing it (MultiLoRA for LoRA) and the class's own file are not."""
    home = tmp_path / "more.py"
    other = tmp_path / "x.py"
    names = {"LoRA": tmp_path / "lora.py", "MoRE": home}
    other.write_text("if isinstance(a, (DoRA,\n    MoRE)):\n    pass\nisinstance(a, MultiLoRA)\n")
    home.write_text("isinstance(a, MoRE)\n")
    assert class_tests(other, names) == [(1, "isinstance(a, (DoRA,\n    MoRE))")]
    assert class_tests(home, names) == []


# ----------------------------------------------------------------------------- the house
def python_files() -> list[Path]:
    """The project's own Python files: the library, the workbench, the scripts and the tests."""
    return sorted([*ROOT.glob("*.py"), *(ROOT / "mtlref").rglob("*.py"), *(ROOT / "experiments").rglob("*.py"),
                   *(ROOT / "tests").glob("*.py")])


def mtlref_imports() -> dict[str, set[str]]:
    """module -> the mtlref modules it imports (absolute imports, read with ast; a package's
    __init__ counts as the package)."""
    import ast
    names = {}
    for path in (ROOT / "mtlref").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for mod, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[mod] = {m for m in found if m in names and m != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops of `graph`, each as a path that comes back to its start (a module's
    package face importing the module is not a loop: the face hands names on)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):                  # a package's face importing its own modules
                continue
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_mtlref_imports_point_one_way():
    """No two modules of mtlref import each other, directly or around a loop, and none imports the
    workbench (experiments/) or loads a module by name (importlib.import_module): the import
    graph is the whole story of who depends on whom."""
    graph = mtlref_imports()
    assert {"mtlref.run", "mtlref.pretrained", "mtlref.models.llama"} <= set(graph)
    assert cycles(graph) == []
    offenders = [f"{p.relative_to(ROOT)}" for p in (ROOT / "mtlref").rglob("*.py")
                 if "import_module(" in p.read_text() or re.search(r"^\s*(from|import) experiments\b", p.read_text(), re.M)]
    assert not offenders, f"loads modules by name or imports the workbench: {offenders}"


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"p": {"p.x"}, "p.x": {"p"}}) == []          # a face and its module
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_script_edits_sys_path_and_every_file_is_short():
    """sys.path is the installed packages' business (pyproject installs mtlref and experiments);
    a file of the library, the workbench or the scripts stays under ~350 lines."""
    edits = [f"{p.relative_to(ROOT)}" for p in python_files() if re.search(r"sys\.path\.(insert|append)", p.read_text())
             and p.name != "test_layout.py"]
    assert not edits, f"these files edit sys.path: {edits}"
    long = {f"{p.relative_to(ROOT)}": n for p in python_files() if "tests" not in p.parts
            and (n := len(p.read_text().splitlines())) > 350}
    assert not long, f"over 350 lines (split it, or list it with its reason in docs/ARCHITECTURE.md): {long}"
