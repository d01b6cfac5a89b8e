"""The loop's check of each request and its retry with another target (distill_forget/check.py)."""

import json

import pytest
from test_train import FAST, finish, kill_when, train

from distill_forget.check import against_bars, broken_bars, check_settings, decided, kept_attempt
from distill_forget.config import load_config
from distill_forget.distill.step import RECORD_FILE
from distill_forget.ledger import Ledger

BARS = {"ua": 95.0, "ira": 95.0, "cra": 95.0, "nra": 90.0}


def test_bars_compare_ua_as_it_is_and_the_retention_metrics_relative_to_the_base_model():
    base = {"ua": 0.0, "ira": 80.0, "cra": 90.0, "nra": 60.0}
    reached = against_bars({"ua": 97.0, "ira": 76.0, "cra": 86.4, "nra": None}, base)
    assert reached == {"ua": 97.0, "ira": 95.0, "cra": 96.0}  # NRA unmeasured
    assert broken_bars({"ua": 97.0, "ira": 76.0, "cra": 86.4, "nra": 54.0}, base, BARS) == {}  # 95, 96, 90 % of base
    broken = broken_bars({"ua": 94.0, "ira": 75.2, "cra": 90.0, "nra": 53.4}, base, BARS)
    assert broken == {"ua": 1.0, "ira": 1.0, "nra": 1.0}  # 94 %; 94 % and 89 % of base
    unmeasured = {"ua": None, "ira": 10.0, "cra": 90.0, "nra": None}
    assert broken_bars(unmeasured, {**base, "ira": 0.0}, BARS) == {}


def attempt(target, broken):
    return {"target": target, "others": ["ring"], "check": {"holds": not broken, "broken": broken}}


def test_the_first_attempt_that_holds_is_kept_else_the_one_least_under_the_bars():
    assert kept_attempt([attempt("a", {"ua": 5.0}), attempt("b", {}), attempt("c", {})]) == 1
    none_holds = [attempt("a", {"ua": 5.0}), attempt("b", {"ira": 2.0, "nra": 4.0}), attempt("c", {"ua": 3.0})]
    assert kept_attempt(none_holds) == 2
    assert kept_attempt([attempt("a", {"ua": 1.0}), attempt("b", {"ua": 1.0})]) == 0  # equals: the first


def test_attempts_stop_when_one_holds_the_retries_are_spent_or_no_target_is_left():
    failed = attempt("a", {"ua": 5.0})
    assert not decided([failed], retries=1)
    assert decided([attempt("a", {})], retries=1)
    assert decided([failed, attempt("b", {"ua": 1.0})], retries=1)
    assert decided([{**failed, "others": []}], retries=3)


def test_check_settings_are_refused_before_any_work():
    def settings(*argv):
        return load_config("train", list(argv), sections=("step", "evaluate"))

    check_settings(settings())  # off
    check_settings(settings("check.retries=2"))
    for argv, message in (
        (["check.retries=-1"], "integer >= 0"),
        (["check.retries=1", "check.seeds=[1, 10]"], "share none of evaluate.seeds"),
        (["check.retries=1", "setting=independent"], "setting=sequential"),
        (["check.retries=1", "check.bars.quality=10"], "quality"),
    ):
        with pytest.raises(SystemExit, match=message):
            check_settings(settings(*argv))


def test_a_request_that_breaks_a_bar_is_retrained_without_its_target_and_a_killed_retry_resumes(
    tiny_pipeline_dir, tmp_path, random_judge
):
    """A random judge reads the student's images as the base model's: every retention metric is 100 % of
    base, under a bar of 101 %, so every attempt breaks it."""
    requests = tmp_path / "requests.yaml"
    requests.write_text("requests:\n  - {concept: dots, kind: style}\n")
    run_dir = tmp_path / "run"
    args = [f"model={tiny_pipeline_dir}", f"judge={random_judge}", f"requests={requests}", f"run_dir={run_dir}", *FAST,
            "check.retries=1", "check.seeds=[5]", "check.bars.ira=101"]  # fmt: skip
    folder = run_dir / "steps" / "01-dots"
    kill_when(train(args), lambda: (folder / "attempts" / "0.json").exists()
              and (folder / "checkpoints" / "1" / "last.ckpt").exists())  # fmt: skip
    first = json.loads((folder / "attempts" / "0.json").read_text())
    assert first["check"]["against_bars"]["ira"] == 100.0 and first["check"]["broken"] == {"ira": 1.0}
    assert first["target"] not in first["others"]
    out = finish(args)
    assert f"[check] 'dots': attempt 2, without the targets ['{first['target']}']" in out
    assert "resuming 'dots' from" in out  # the retry goes on from its checkpoint
    assert f"[check] 'dots' onto '{first['target']}'" not in out  # the first attempt is not checked again
    (record,) = Ledger(run_dir / "ledger.jsonl").verify()
    tried = [a["target"] for a in record["check"]["attempts"]]
    assert len(tried) == 2 and tried[0] == first["target"] != tried[1]
    assert record["check"]["kept"] == 0  # both one point under: the first is kept
    assert record["targets"]["counts"] == {first["target"]: record["targets"]["counts"][first["target"]]}
    spent = sum(a["seconds"] + a["check"]["seconds"] for a in record["check"]["attempts"])
    assert record["seconds"] >= spent - 0.1  # every attempt's training and check (each rounded)
    assert sorted(p.name for p in (folder / "attempts").iterdir()) == ["0.json", "1.json"]  # the students not kept go
    assert "attempts" not in (folder / "pipeline" / RECORD_FILE).read_text()  # no folder it was renamed from
    assert not (folder / "checkpoints").exists()
    assert json.loads((run_dir / "base" / "check.json").read_text())["seeds"] == [5]
