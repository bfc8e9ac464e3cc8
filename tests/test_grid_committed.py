"""Each grid file's "committed" field lists, for every variant, the seeds of its result files in
experiments/results/<grid>/ (experiments/grid.py committed()), so a result file added, removed or
renamed without the grid file following fails here; `python experiments/grid.py GRID.json`
rewrites the field and nothing else of the file."""
import json
from pathlib import Path

import pytest

from conftest import ROOT
from experiments import grid as G

GRIDS = sorted((ROOT / "experiments" / "grids").glob("*.json"))


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_each_grid_file_lists_the_seeds_of_its_result_files(path):
    grid = G.load_grid(path)
    fix = f"python experiments/grid.py {path.relative_to(ROOT)}"
    assert "committed" in grid, f"{path.name} has no \"committed\" field: {fix}"
    assert grid["committed"] == G.committed(grid), f"{path.name}'s \"committed\" is out of date: {fix}"
    for variant, seeds in grid["committed"].items():      # each file is what its name says
        for seed in seeds:
            res = json.loads((G.RESULTS / grid["name"] / f"{variant}__s{seed}.json").read_text())
            assert (res["grid"], res["variant"], res["seed"]) == (grid["name"], variant, seed)


def test_the_real_grids_are_all_checked():
    assert {p.stem for p in GRIDS} >= {"main", "ablation-more", "ablation-mtl-lora", "fewshot"}


def write_results(results: Path, grid: str, names: list[str]) -> None:
    (results / grid).mkdir(parents=True, exist_ok=True)
    for name in names:
        (results / grid / name).write_text("{}\n")


def test_write_committed_changes_that_field_only(tmp_path):
    text = ('{\n "name": "g",\n "variants": {\n  "a": ["--method", "lora"],\n  "b-lr5e-4": ["--lr", "5e-4"]\n },\n'
            ' "seeds": [0],\n "minutes_per_cell": {"2": 12, "1": 25}\n}\n')
    path = tmp_path / "g.json"
    path.write_text(text)
    results = tmp_path / "results"
    write_results(results, "g", ["a__s0.json", "a__s2.json", "a__s1.json"])
    assert G.write_committed(path, results) == {"a": [0, 1, 2], "b-lr5e-4": []}
    first = path.read_text()
    assert first == text[:-3] + ',\n "committed": {\n  "a": [0, 1, 2],\n  "b-lr5e-4": []\n }\n}\n'
    assert G.load_grid(path)["committed"] == {"a": [0, 1, 2], "b-lr5e-4": []}
    write_results(results, "g", ["b-lr5e-4__s0.json"])
    G.write_committed(path, results)
    assert path.read_text() == first.replace('"b-lr5e-4": []', '"b-lr5e-4": [0]')
    G.write_committed(path, results)                                       # nothing new: the same bytes
    assert path.read_text() == first.replace('"b-lr5e-4": []', '"b-lr5e-4": [0]')
    assert G.main(["--check", "--results", str(results), str(path)]) == 0
    write_results(results, "g", ["a__s7.json"])
    assert G.main(["--check", "--results", str(results), str(path)]) == 1      # stale: says so, writes nothing
    assert G.load_grid(path)["committed"]["a"] == [0, 1, 2]


def test_stray_result_files_and_bad_committed_fields_are_errors(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"name": "g", "variants": {"a": []}, "seeds": [0]}))
    write_results(tmp_path / "results", "g", ["gone__s0.json"])
    with pytest.raises(SystemExit, match=r"variants the grid 'g' does not have: \['gone'\]"):
        G.committed(G.load_grid(path), tmp_path / "results")
    for bad, message in [({"z": [0]}, "names variants the grid does not have"),
                         ({"a": ["0"]}, "must map variants to lists of seeds"), ([0], "must map variants")]:
        path.write_text(json.dumps({"name": "g", "variants": {"a": []}, "seeds": [0], "committed": bad}))
        with pytest.raises(SystemExit, match=message):
            G.load_grid(path)
