"""The metrics give the known answer on hand-made cases."""

import pytest

from distill_forget.metrics import compute_metrics, relative_to_base

DOMAINS = {"object": ["circle", "ring", "star", "heart"], "style": ["dots", "big dots", "neon"]}


def records(judge):
    """One image per (object, style) pair, judged by `judge(prompt) -> seen`."""
    out = []
    for o in DOMAINS["object"]:
        for s in DOMAINS["style"]:
            prompt = {"object": o, "style": s}
            out.append({"prompt": prompt, "seen": judge(prompt)})
    return out


def always_right(prompt):
    return dict(prompt)


def always_wrong(prompt):
    return {k: next(c for c in DOMAINS[k] if c != v) for k, v in prompt.items()}


def test_a_judge_that_is_always_right():
    result = compute_metrics(records(always_right), DOMAINS, forgotten=["star"], neighbors=[])
    m = result["metrics"]
    assert m["object_accuracy"] == m["style_accuracy"] == 100.0
    assert m["ua"] == 0.0  # the forgotten concept still appears: nothing was forgotten
    assert m["ira"] == m["cra"] == 100.0
    assert result["per_concept"]["star"]["role"] == "forgotten"


def test_a_judge_that_is_always_wrong():
    m = compute_metrics(records(always_wrong), DOMAINS, forgotten=["star"], neighbors=["heart"])["metrics"]
    assert m["object_accuracy"] == m["style_accuracy"] == 0.0
    assert m["ua"] == 100.0
    assert m["ira"] == m["cra"] == m["nra"] == 0.0


def test_a_forgotten_concept_that_is_removed_while_the_rest_stays():
    def judge(prompt):
        seen = dict(prompt)
        if prompt["style"] == "dots":
            seen["style"] = "neon"  # the model draws something else for 'dots'
        return seen

    result = compute_metrics(records(judge), DOMAINS, forgotten=["dots"], neighbors=["big dots"], replayed=["circle"])
    m = result["metrics"]
    assert m["ua"] == 100.0
    assert m["ira"] == 100.0 and m["cra"] == 100.0 and m["nra"] == 100.0
    assert m["cra_unseen"] == 100.0
    # retained accuracy leaves out images whose prompt names the forgotten concept
    assert result["per_concept"]["circle"]["images"] == 2


def test_partial_forgetting_and_damage_to_a_neighbour():
    def judge(prompt):
        seen = dict(prompt)
        if prompt["style"] == "dots" and prompt["object"] in ("circle", "ring"):
            seen["style"] = "neon"  # forgotten on half of its images
        if prompt["style"] == "big dots" and prompt["object"] == "circle":
            seen["style"] = "dots"  # a neighbour damaged on 1 of its 4 images
        return seen

    result = compute_metrics(records(judge), DOMAINS, forgotten=["dots"], neighbors=["big dots"])
    m = result["metrics"]
    assert m["ua"] == 50.0
    assert m["nra"] == 75.0
    assert m["ira"] == 100.0  # neon: the one in-domain retained non-neighbour
    # what the judge reads instead, most first: where the forgotten concept went, what replaced the damaged one
    read_as = {c: row["read_as"] for c, row in result["per_concept"].items()}
    assert read_as["dots"] == {"neon": 2, "dots": 2}
    assert read_as["big dots"] == {"big dots": 3, "dots": 1}
    assert list(read_as["big dots"]) == ["big dots", "dots"]
    assert read_as["circle"] == {"circle": 2}  # its images naming 'dots' are left out, as for its accuracy


def test_in_and_cross_domain_follow_the_kind_of_each_forgotten_concept():
    def judge(prompt):
        seen = dict(prompt)
        seen["object"] = "circle"  # every object collapses to a circle
        return seen

    m = compute_metrics(records(judge), DOMAINS, forgotten=["neon"], neighbors=[])["metrics"]
    assert m["ira"] == 100.0  # other styles are intact
    assert m["cra"] == 25.0  # objects: only 'circle' is right


def test_unknown_concepts_are_rejected():
    with pytest.raises(KeyError, match="unicorn"):
        compute_metrics(records(always_right), DOMAINS, forgotten=["unicorn"])


def test_retention_relative_to_base():
    assert relative_to_base({"ira": 45.0, "cra": 90.0}, {"ira": 90.0, "cra": 90.0}) == {
        "ira_rel": 50.0,
        "cra_rel": 100.0,
    }
