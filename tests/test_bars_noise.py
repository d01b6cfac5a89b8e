"""The bars' figures on more seeds: fresh seeds only, groups and pool computed as the loop does,
the loop's own reading as the first group, the images of each concept counted, a rerun that draws
nothing again, judgements of other weights drawn again, steps the run's ledger does not record
refused, and a reading in another sentence kept apart from the loop's."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from distill_forget import bars_noise
from distill_forget.bars_noise import concept_counts, step_noise, study_seeds, where_drawn
from distill_forget.check import against_bars
from distill_forget.config import load_config, read_config
from distill_forget.evaluate import evaluate_pipeline, load_judge
from distill_forget.ledger import Ledger, utc_now, weights_hash
from distill_forget.metrics import compute_metrics
from distill_forget.pipelines import load_pipeline


def test_the_added_seeds_are_none_the_run_used():
    run_cfg = OmegaConf.create({"evaluate": {"seeds": [0, 1, 2]}, "check": {"seeds": [10, 11, 12]}})
    assert study_seeds(run_cfg, 9) == [0, 1, 2, 13, 14, 15, 16, 17, 18]
    assert study_seeds(run_cfg, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="multiple of the evaluation's 3 seeds"):
        study_seeds(run_cfg, 10)


def _grid(seeds, misread=lambda prompt, seed: {}):
    objects, styles = ["a", "b", "c"], ["x", "y"]
    return [{"prompt": {"object": o, "style": s}, "seen": {"object": o, "style": s, **misread((o, s), seed)},
             "seed": seed}
            for seed in seeds for o in objects for s in styles]  # fmt: skip


def test_each_group_and_the_pool_read_as_the_loop_reads_them():
    domains = {"object": ["a", "b", "c"], "style": ["x", "y"]}
    sets = {"forgotten": ["a"], "neighbors": ["b"], "replayed": None}

    def misread(pair, seed):
        if pair[0] == "a" and seed < 3:  # forgotten on the first group's seeds only
            return {"object": "c"}
        if pair == ("a", "x"):  # and in half of its images on the others
            return {"object": "c"}
        if pair == ("b", "y") and seed == 4:  # one neighbour image lost in the second group
            return {"object": "c"}
        return {}

    seeds = list(range(6))
    noise = step_noise(_grid(seeds, misread), _grid(seeds), sets, domains, seeds, 3, {"ua": 95.0, "nra": 90.0})

    assert noise["ua"] == {"pooled": 75.0, "groups": [100.0, 50.0], "bar": 95.0, "groups_under": 1}
    assert noise["nra"]["groups"] == [100.0, pytest.approx(83.33, abs=0.01)]
    assert noise["nra"]["pooled"] == pytest.approx(91.67, abs=0.01) and noise["nra"]["groups_under"] == 1
    assert noise["ira"] == {"pooled": 100.0, "groups": [100.0, 100.0], "bar": None, "groups_under": None}

    counts = concept_counts(_grid(seeds, misread), _grid(seeds), sets, domains, seeds)
    assert counts["a"] == {"role": "forgotten", "images": 12, "drawn": 3, "base_drawn": 12}  # (a, x) on seeds 3-5
    assert counts["b"] == {"role": "neighbor", "images": 12, "drawn": 11, "base_drawn": 12}
    assert counts["c"] == {"role": "retained", "images": 12, "drawn": 12, "base_drawn": 12}
    assert where_drawn(counts) == ("a 3/12", "b (n) 11/12 (base 12)")


@pytest.fixture
def evaluated_run(tmp_path, tiny_pipeline_dir, teacher_dir):
    """A run folder as the loop leaves it: its config, the base's evaluation, one evaluated step, the ledger."""
    run = tmp_path / "run"
    cfg = OmegaConf.merge(read_config("train"), {"model": str(tiny_pipeline_dir), "threads": 2})
    cfg.evaluate = load_config("evaluate", ["sampling_steps=2", "seeds=[0]", "batch=72", "reference_repeats=1"])
    (run / "base").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    judge = load_judge(None).eval()
    base, _ = evaluate_pipeline(load_pipeline(tiny_pipeline_dir), judge, cfg.evaluate)
    (run / "base" / "metrics.json").write_text(json.dumps(base))
    step = run / "steps" / "01-star"
    shutil.copytree(teacher_dir, step / "pipeline")
    result, _ = evaluate_pipeline(load_pipeline(teacher_dir), judge, cfg.evaluate, ["star"], replayed=["circle"])
    (step / "metrics.json").write_text(json.dumps(result))
    Ledger(run / "ledger.jsonl").append(
        {"index": 1, "request": {"concept": "star", "kind": "object"}, "settings": {}, "started": utc_now(),
         "finished": utc_now(), "targets": {}, "neighbors": {}, "metrics": result["metrics"],
         "input_hash": weights_hash(tiny_pipeline_dir), "output_hash": weights_hash(step / "pipeline")}
    )  # fmt: skip
    return run, base, result


def test_a_run_read_on_more_seeds_starts_from_its_own_reading_and_reruns_without_drawing(evaluated_run, monkeypatch):
    run, base, evaluation = evaluated_run
    bars_noise.main([str(run), "--seeds", "2"])

    written = json.loads((run / "bars_noise" / "bars_noise.json").read_text())
    assert written["seeds"] == [0, 13] and written["group"] == 1
    (row,) = written["steps"]
    assert (row["index"], row["concept"]) == (1, "star")
    domains = load_judge(None).domains
    base_on_sets = compute_metrics(base["judged"], domains, ["star"], evaluation["neighbors"], ["circle"])["metrics"]
    loop_reading = against_bars({k: evaluation["metrics"][k] for k in row["bars"]}, base_on_sets)
    assert {name: bar["groups"][0] for name, bar in row["bars"].items()} == loop_reading
    assert {len(bar["groups"]) for bar in row["bars"].values()} == {2}
    cached = json.loads((run / "bars_noise" / "01-star.json").read_text())["judged"]
    assert {r["seed"] for r in cached} == {13}  # only the drawn seed is kept; seed 0's are the evaluation's
    ua = row["bars"]["ua"]
    star = row["concepts"]["star"]
    assert star["role"] == "forgotten" and 100 * (1 - star["drawn"] / star["images"]) == pytest.approx(ua["pooled"])
    table = (run / "bars_noise" / "bars_noise.md").read_text()
    assert f"| 1 | star | {ua['pooled']:.1f} (loop {ua['groups'][0]:.1f}) [" in table
    assert f"| 1 | star | {where_drawn(row['concepts'])[0]} |" in table

    def no_drawing(*args, **kwargs):
        raise AssertionError("a rerun drew images again")

    monkeypatch.setattr(bars_noise, "generate", no_drawing)
    bars_noise.main([str(run), "--seeds", "2"])
    assert json.loads((run / "bars_noise" / "bars_noise.json").read_text()) == written


def test_a_folder_that_is_no_run_an_unknown_step_or_a_cut_off_cache_is_refused_by_name(evaluated_run, tmp_path):
    with pytest.raises(SystemExit, match="is not an evaluated run folder"):
        bars_noise.main([str(tmp_path / "nothing")])
    run, _, _ = evaluated_run
    with pytest.raises(SystemExit, match=r"--steps \['02-heart'\]: no evaluated step"):
        bars_noise.main([str(run), "--steps", "02-heart"])
    (run / "bars_noise").mkdir()
    (run / "bars_noise" / "base.json").write_text('{"judged": [')  # cut off
    with pytest.raises(SystemExit, match=r"base.json is not a judgement file of bars_noise"):
        bars_noise.main([str(run)])


def seeds_drawn(monkeypatch) -> list[list[int]]:
    """The seeds of every call that draws images from now on, one list per call."""
    drawn_for = []
    generate = bars_noise.generate

    def counting(pipe, items, *args):
        drawn_for.append(sorted({item["seed"] for item in items}))
        return generate(pipe, items, *args)

    monkeypatch.setattr(bars_noise, "generate", counting)
    return drawn_for


def test_judgements_kept_for_other_weights_are_drawn_again(evaluated_run, monkeypatch):
    run, _, _ = evaluated_run
    bars_noise.main([str(run), "--seeds", "2"])
    kept = run / "bars_noise" / "01-star.json"
    cached = json.loads(kept.read_text())
    assert cached["weights"] == weights_hash(run / "steps" / "01-star" / "pipeline")
    kept.write_text(json.dumps({**cached, "weights": "0" * 64}))  # as if the step folder had been replaced

    drawn_for = seeds_drawn(monkeypatch)
    bars_noise.main([str(run), "--seeds", "2"])
    assert drawn_for == [[13]]  # the step's fresh seed again; the base's judgements still hold
    assert json.loads(kept.read_text())["weights"] == cached["weights"]


def test_another_runs_judgements_of_the_same_starting_model_are_taken_not_drawn(evaluated_run, tmp_path, monkeypatch):
    run, _, _ = evaluated_run
    other = tmp_path / "other"
    shutil.copytree(run, other)  # another run of the same starting model and evaluation
    with pytest.raises(SystemExit, match=r"other/bars_noise/base.json is missing"):
        bars_noise.main([str(run), "--seeds", "2", "--base-from", str(other)])
    bars_noise.main([str(other), "--seeds", "2"])

    drawn_for = seeds_drawn(monkeypatch)
    bars_noise.main([str(run), "--seeds", "2", "--base-from", str(other)])
    assert drawn_for == [[13]]  # the step's fresh seed; the starting model's came from the other run
    ours, theirs = (json.loads((r / "bars_noise" / "base.json").read_text()) for r in (run, other))
    assert ours["judged"] == theirs["judged"] and ours["weights"] == theirs["weights"]
    assert json.loads((run / "bars_noise" / "bars_noise.json").read_text())["steps"] == json.loads(
        (other / "bars_noise" / "bars_noise.json").read_text()
    )["steps"]

    config = OmegaConf.load(other / "config.yaml")  # drawn with other sampler settings: refused
    OmegaConf.save(OmegaConf.merge(config, {"evaluate": {"sampling_steps": 3}}), other / "config.yaml")
    with pytest.raises(SystemExit, match=r"its evaluate.sampling_steps is 3, this run's 2"):
        bars_noise.main([str(run), "--seeds", "2", "--base-from", str(other)])
    OmegaConf.save(config, other / "config.yaml")
    kept = other / "bars_noise" / "base.json"  # drawn from other weights: refused
    kept.write_text(json.dumps({**theirs, "weights": "0" * 64}))
    with pytest.raises(SystemExit, match="drawn from other weights"):
        bars_noise.main([str(run), "--seeds", "2", "--base-from", str(other)])


def test_a_step_or_model_other_than_the_ledger_records_is_refused_before_drawing(
    evaluated_run, tiny_pipeline_dir, teacher_dir, monkeypatch
):
    run, _, evaluation = evaluated_run

    def no_drawing(*args, **kwargs):
        raise AssertionError("drew images of a model the ledger does not record")

    monkeypatch.setattr(bars_noise, "generate", no_drawing)
    step = run / "steps" / "01-star"
    metrics = step / "metrics.json"
    metrics.write_text(json.dumps({**evaluation, "metrics": {**evaluation["metrics"], "ira": -1.0}}))
    with pytest.raises(SystemExit, match=r"01-star/metrics.json is not the evaluation ledger record 1 holds"):
        bars_noise.main([str(run), "--seeds", "2"])
    metrics.write_text(json.dumps(evaluation))

    other = run / "steps" / "02-heart"  # evaluated, but the loop never recorded it
    shutil.copytree(step, other)
    with pytest.raises(SystemExit, match="02-heart: the ledger has no record of request 2"):
        bars_noise.main([str(run), "--seeds", "2"])
    shutil.rmtree(other)

    shutil.rmtree(step / "pipeline")  # replaced by other weights after the request finished
    shutil.copytree(tiny_pipeline_dir, step / "pipeline")
    with pytest.raises(SystemExit, match=r"refusing to read .*01-star: .*weights do not match ledger record 1"):
        bars_noise.main([str(run), "--seeds", "2"])
    shutil.rmtree(step / "pipeline")
    shutil.copytree(teacher_dir, step / "pipeline")

    config = OmegaConf.load(run / "config.yaml")
    OmegaConf.save(OmegaConf.merge(config, {"model": str(teacher_dir)}), run / "config.yaml")
    with pytest.raises(SystemExit, match="not those the run's first request started from"):
        bars_noise.main([str(run), "--seeds", "2"])
    OmegaConf.save(config, run / "config.yaml")

    (run / "ledger.jsonl").write_text((run / "ledger.jsonl").read_text().replace('"star"', '"heart"'))
    with pytest.raises(SystemExit, match="the run's ledger does not verify"):
        bars_noise.main([str(run), "--seeds", "2"])


def test_another_sentence_draws_every_image_from_it_in_a_folder_of_its_own(evaluated_run, monkeypatch):
    run, _, _ = evaluated_run
    bars_noise.main([str(run), "--seeds", "2"])  # the evaluation's sentence: seed 0 is the loop's, 13 drawn
    default = json.loads((run / "bars_noise" / "bars_noise.json").read_text())
    sentence = "a drawing of a {object} in {style} style"
    drawn = []
    generate = bars_noise.generate

    def recording(pipe, items, *args):
        drawn.append(({item["seed"] for item in items}, {item.get("template") for item in items}))
        return generate(pipe, items, *args)

    monkeypatch.setattr(bars_noise, "generate", recording)
    bars_noise.main([str(run), "--seeds", "2", "--template", sentence])
    # nothing of the evaluation's is reused: both seeds drawn, for the base model and the step, from the sentence
    assert drawn == [({0, 13}, {sentence})] * 2
    out = run / "bars_noise" / "sentence-a-drawing-of-a-OBJECT-in-STYLE-style"
    written = json.loads((out / "bars_noise.json").read_text())
    assert written["template"] == sentence and written["seeds"] == [0, 13]
    assert json.loads((out / "01-star.json").read_text())["template"] == sentence
    assert "(seeds 0-0 " in (out / "bars_noise.md").read_text()
    assert json.loads((run / "bars_noise" / "bars_noise.json").read_text()) == default  # left as it was

    drawn.clear()
    bars_noise.main([str(run), "--seeds", "2", "--template", sentence])
    assert drawn == []  # a rerun reads its own folder's judgements
    cache = out / "01-star.json"
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "template": None}))  # as if of the loop's sentence
    bars_noise.main([str(run), "--seeds", "2", "--template", sentence])
    assert drawn == [({0, 13}, {sentence})]

    with pytest.raises(SystemExit, match=r"--template: 'a drawing of a \{object\}' must hold"):
        bars_noise.main([str(run), "--template", "a drawing of a {object}"])
