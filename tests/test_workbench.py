"""experiments/ is the research workbench around the library (the bench harness, the grids, their
statistics and the replication report): mtlref/ imports nothing from it; experiments is an
installed package like mtlref, so no script edits sys.path and no test loads one of its scripts by
its file path."""
import ast
from pathlib import Path

from conftest import ROOT


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `path`, and of every importlib.import_module /
    __import__ call with a literal name."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            out.append((node.lineno, node.args[0].value))
    return out


def workbench_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}: {name}"
            for line, name in imports(path) if name.split(".")[0] == "experiments"]


def test_the_library_imports_nothing_from_the_workbench():
    files = sorted((ROOT / "mtlref").rglob("*.py"))
    assert ROOT / "mtlref" / "__init__.py" in files and len(files) > 20
    offenders = [o for path in files for o in workbench_imports(path)]
    assert not offenders, f"mtlref/ must not import experiments/ (the workbench is about the library): {offenders}"


def test_the_import_finder_finds_each_form(tmp_path):
    """The finder itself: `import experiments...`, `from experiments... import`, import_module and
    __import__ with the name; not a relative import, another package or the word in a string."""
    f = tmp_path / "x.py"
    f.write_text("import os, experiments.grid\nfrom experiments.stats import paired_t\nfrom . import experiments\n"
                 "import importlib\nimportlib.import_module('experiments.bench.timing')\n__import__('experiments')\n"
                 "import experimentsx\ns = 'from experiments import grid'\n")
    assert [o.split(": ", 1)[1] for o in workbench_imports(f)] == [
        "experiments.grid", "experiments.stats", "experiments.bench.timing", "experiments"]


def test_no_script_edits_sys_path():
    """The commands (train.py, eval.py, export.py, bench.py, experiments/*.py) import mtlref and
    experiments as installed packages (pip install -e .), never by putting the repository on sys.path."""
    files = [*sorted(ROOT.glob("*.py")), *sorted((ROOT / "experiments").rglob("*.py")),
             *sorted((ROOT / "mtlref").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]
    assert ROOT / "experiments" / "run.py" in files and ROOT / "bench.py" in files
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in files
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Attribute) and node.attr == "path" and ast.unparse(node.value) == "sys"]
    assert not offenders, f"sys.path is touched here: {offenders}"


def test_no_test_loads_a_workbench_script_by_its_path():
    """A test imports what it tests from the experiments package, never an experiments/ file
    through importlib.util.spec_from_file_location."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("spec_from_file_location")
                    and "experiments" in ast.get_source_segment(text, node)):
                offenders.append(f"tests/{path.name}:{node.lineno}")
    assert not offenders, offenders
