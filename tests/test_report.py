"""The report files have the structure readers rely on."""

import json

import pytest
from PIL import Image

from distill_forget.report import MAIN_METRICS, write_report

BASE = {"metrics": {"ua": 2.0, "ira": 90.0, "cra": 80.0, "nra": 70.0, "quality": 1.5, "object_accuracy": 88.0}}
STEPS = [
    {
        "index": 1,
        "concept": "dots",
        "kind": "style",
        "metrics": {"ua": 98.0, "ira": 81.0, "cra": 80.0, "nra": 35.0, "quality": 1.8, "object_accuracy": 85.0},
        "seconds": 120.0,
        "checkpoint": "steps/01-dots/pipeline",
        "targets": {"mosaic": 27},
        "read_as": {"checkerboard": 27, "dots": 9},
    },
    {
        "index": 2,
        "concept": "circle",
        "kind": "object",
        "metrics": {"ua": 97.0, "ira": 72.0, "cra": 78.0, "quality": 2.1},  # nra not measured
        "base_metrics": {"ira": 90.0, "cra": 80.0, "quality": 1.4},  # the base over this step's own pairs
        "seconds": 100.0,
    },
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One report shared by the tests below: plotting is the slow part."""
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, write_report(run_dir, BASE, STEPS)


def test_report_json_has_the_required_structure(written):
    run_dir, _ = written
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) == {"base", "steps"}
    assert set(MAIN_METRICS) <= set(report["base"]["metrics"])
    assert [s["index"] for s in report["steps"]] == [1, 2]
    for step in report["steps"]:
        assert set(MAIN_METRICS) <= set(step["metrics"])
        assert isinstance(step["seconds"], float)
    second = report["steps"][1]
    assert second["metrics"]["nra"] is None
    assert second["cumulative_seconds"] == 220.0
    assert second["relative_to_base"]["ira_rel"] == 80.0  # 72 / 90
    assert report["steps"][0]["quality_vs_base"] == 20.0  # 1.8 against the base's 1.5
    assert second["quality_vs_base"] == 50.0  # 2.1 against the base's 1.4 over the same pairs, not 1.5
    assert report["steps"][0]["checkpoint"] == "steps/01-dots/pipeline"  # extra keys are kept


def test_report_md_has_base_and_one_row_per_request(written):
    run_dir, _ = written
    metrics_part = (run_dir / "report.md").read_text().split("Where each request")[0]
    table = [line for line in metrics_part.splitlines() if line.startswith("|")]
    header, _, *rows = table
    assert "UA" in header and "NRA" in header and "seconds" in header
    assert len(rows) == 1 + len(STEPS)
    assert rows[0].startswith("| 0 (base) |")
    assert "| 1 | dots (style) | 98.0 | 81.0 | 80.0 | 35.0 | 1.8 | 90.0 / 100.0 / 50.0 | +20.0 | 120.0 |" in rows[1]
    assert "| 97.0 | 72.0 | 78.0 | - |" in rows[2]  # None shown as "-"
    assert "| 80.0 / 97.5 / - | +50.0 | 100.0 |" in rows[2]
    assert "distill_forget.quality_noise" in (run_dir / "report.md").read_text()  # how far to trust the figure


def test_report_md_says_where_each_concept_went(written):
    run_dir, _ = written
    text = (run_dir / "report.md").read_text()
    assert "| 1 | dots | mosaic 27 | checkerboard 27, dots 9 |" in text
    assert "| 2 | circle |" not in text  # a step without readings (an older ledger record) has no row


def test_the_where_table_names_the_targets_the_loops_check_tried(tmp_path):
    def attempt(target, broken):
        return {"target": target, "check": {"broken": broken, "holds": not broken}}

    retried = {**STEPS[0], "targets": {"pastel color": 27},
               "check": {"kept": 1,
                         "attempts": [attempt("mosaic", {"ua": 11.7}), attempt("pastel color", {})]}}  # fmt: skip
    unheld = {**STEPS[0], "index": 2, "concept": "star", "targets": {"cross": 31}, "read_as": {"cross": 36},
              "check": {"kept": 0,
                        "attempts": [attempt("cross", {"ua": 0.6}), attempt("heart", {"ira": 3.0})]}}  # fmt: skip
    write_report(tmp_path, BASE, [retried, unheld])
    text = (tmp_path / "report.md").read_text()
    assert "| 1 | dots | pastel color 27; tried: mosaic (UA -11.7) | checkerboard 27, dots 9 |" in text
    assert "| 2 | star | cross 31; tried: heart (IRA -3.0); kept under the bars (UA -0.6) | cross 36 |" in text


def test_the_plots_are_valid_pngs(written):
    run_dir, paths = written
    for name in ("metrics.png", "cost.png"):
        assert paths[name] == run_dir / name
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(run_dir / name) as image:
            image.verify()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind


def test_a_report_with_no_requests_yet(tmp_path):
    write_report(tmp_path, BASE, [])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == []
    assert (tmp_path / "metrics.png").exists() and (tmp_path / "cost.png").exists()
