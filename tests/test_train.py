"""The Repeat loop: resumes after a kill, refuses tampered weights, runs its default in reduced form."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill_forget import train as loop
from distill_forget.config import CONFIG_DIR, load_config
from distill_forget.distill.step import RECORD_FILE
from distill_forget.ledger import Ledger, step_dir
from distill_forget.requests import Request, check_minicanvas, load_requests
from distill_forget.train import as_carried_out, prepare_run_dir

FAST = [
    "threads=1", "step.steps=12", "step.checkpoint_every=2", "step.replay.bank_size=4", "step.sampling_steps=2",
    "step.score.latents=2", "step.batch=2", "evaluate.seeds=[0]", "evaluate.sampling_steps=1",
    "evaluate.reference_repeats=1", "wandb.mode=disabled",  # W&B has its own test (test_wandb.py)
]  # fmt: skip


@pytest.fixture
def tiny_run(tiny_pipeline_dir, tmp_path, random_judge, two_requests):
    judge, requests = random_judge, two_requests
    run_dir = tmp_path / "run"
    args = [f"model={tiny_pipeline_dir}", f"judge={judge}", f"requests={requests}", f"run_dir={run_dir}", *FAST]
    return run_dir, args


def train(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "distill_forget.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def kill_when(proc, condition, timeout=240):
    start = time.time()
    while not condition():
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()[-3000:]
        assert time.time() - start < timeout, "timed out waiting to kill the run"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(args) -> str:
    proc = train(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def ledger_lines(run_dir: Path) -> int:
    path = run_dir / "ledger.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_killed_during_a_request_resumes_from_its_checkpoint(tiny_run):
    run_dir, args = tiny_run
    ckpt = run_dir / "steps" / "02-star" / "checkpoints" / "last.ckpt"
    kill_when(train(args), ckpt.exists)
    assert ledger_lines(run_dir) == 1
    first = (
        run_dir / "steps" / "01-dots" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    ).stat().st_mtime_ns
    # rerun under another setting of what it trains: refused by name, the run folder as it was
    config = (run_dir / "config.yaml").read_text()
    proc = train([*args, "step.lambda_r=50"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "[2/2] 'star': checkpoint" in out and "lambda_r: 25.0 -> 50" in out, out[-3000:]
    assert (run_dir / "config.yaml").read_text() == config and ckpt.exists() and ledger_lines(run_dir) == 1
    out = finish(args)
    assert "'dots': done before, weights verified" in out  # no finished step redone
    assert "resuming 'star' from" in out  # the unfinished one continues from its checkpoint
    records = Ledger(run_dir / "ledger.jsonl").verify()
    assert [r["request"]["concept"] for r in records] == ["dots", "star"]
    assert records[1]["input_hash"] == records[0]["output_hash"]
    assert (
        run_dir / "steps" / "01-dots" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    ).stat().st_mtime_ns == first
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["index"] for s in report["steps"]] == [1, 2]
    for key in ("ua", "ira", "cra", "nra", "quality"):
        assert key in report["base"]["metrics"] and key in report["steps"][1]["metrics"]
    assert report["steps"][0]["seconds"] > 0
    assert not (run_dir / "steps" / "02-star" / "checkpoints").exists()
    # where each forgotten concept went: the judge's readings of its images, in the ledger and the report
    metrics = json.loads((run_dir / "steps" / "02-star" / "metrics.json").read_text())
    assert set(records[1]["read_as"]) == {"dots", "star"}
    for concept, counts in records[1]["read_as"].items():
        assert sum(counts.values()) == metrics["per_concept"][concept]["images"] > 0
    assert report["steps"][1]["read_as"] == records[1]["read_as"]["star"]
    assert report["steps"][1]["targets"] == records[1]["targets"]["counts"]
    assert "| 2 | star |" in (run_dir / "report.md").read_text()


def test_killed_between_requests_loses_no_step_and_tampering_is_refused(tiny_run):
    run_dir, args = tiny_run
    kill_when(train(args), lambda: ledger_lines(run_dir) >= 1)
    out = finish(args)
    assert "'dots': done before" in out
    assert [r["request"]["concept"] for r in Ledger(run_dir / "ledger.jsonl").verify()] == ["dots", "star"]
    assert (run_dir / "steps" / "02-star" / "changed_weights.safetensors").is_file()

    # a tampered step checkpoint is refused by the ledger check
    weights = run_dir / "steps" / "01-dots" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = train(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "refusing to continue from step 1" in out and "01-dots" in out


def test_killed_while_evaluating_a_trained_request_keeps_its_student(tiny_run):
    run_dir, args = tiny_run
    finish(args)
    # The state a kill during request 2's evaluation leaves: its student saved whole (and its
    # checkpoints removed), its ledger record not yet written.
    ledger = run_dir / "ledger.jsonl"
    first, second = ledger.read_text().splitlines()
    ledger.write_text(first + "\n")
    weights = run_dir / "steps" / "02-star" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    out = finish(args)
    assert "'star': trained before the run stopped; its student is kept" in out
    assert "planning the prompts" not in out  # nothing of the request is trained again
    assert weights.stat().st_mtime_ns == written
    records = Ledger(ledger).verify()
    assert [r["request"]["concept"] for r in records] == ["dots", "star"]
    assert records[1]["output_hash"] == json.loads(second)["output_hash"]
    # the training's cost, not the evaluation's alone
    assert records[1]["seconds"] >= json.loads(second)["seconds"] * 0.5


def test_a_malformed_request_file_is_refused_before_any_work(tiny_run, tmp_path):
    run_dir, args = tiny_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("requests:\n  - {concept: dots, kind: colour}\n")
    proc = train([a if not a.startswith("requests=") else f"requests={bad}" for a in args])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "kind" in out and "request 1" in out
    assert not run_dir.exists()


def test_the_shipped_minicanvas_request_files_load_with_the_step_settings_they_name():
    settings = load_config("step", [])
    shipped = {  # an override that names no step setting is refused
        path.name: load_requests(path, settings) for path in sorted((CONFIG_DIR / "requests").glob("minicanvas-*.yaml"))
    }
    sequence = [r.concept for r in shipped["minicanvas-10.yaml"]]
    for name, requests in shipped.items():
        check_minicanvas(requests)
        if name.startswith("minicanvas-10"):
            assert [r.concept for r in requests] == sequence, name
    relative = shipped["minicanvas-10-relative-replays.yaml"]
    assert [r.overrides.get("loss_scale", "mse") for r in relative] == ["mse"] * 2 + ["relative_replays"] * 8
    anchored = shipped["minicanvas-10-base-anchor.yaml"]
    references = [r.overrides.get("regularizers", {}).get("key_value_anchor", {}).get("reference") for r in anchored]
    assert references == [None] * 2 + ["base"] * 8


def test_default_command_smoke_on_the_shipped_model(tmp_path):
    """`python -m distill_forget.train` as the README runs it, with fewer steps and images."""
    run_dir = tmp_path / "default"
    out = finish([f"run_dir={run_dir}", *FAST, "step.steps=2"])
    assert "all 2 requests done" in out
    assert len(Ledger(run_dir / "ledger.jsonl").verify()) == 2
    assert (run_dir / "report.md").is_file() and (run_dir / "metrics.png").is_file()


def test_a_run_folder_continues_with_appended_requests_and_refuses_others(tmp_path, two_requests):
    run_dir, cfg = tmp_path / "run", {"setting": "sequential"}
    first = tmp_path / "first.yaml"
    first.write_text("requests:\n  - {concept: dots, kind: style}\n")
    prepare_run_dir(cfg, first, run_dir)
    prepare_run_dir(cfg, two_requests, run_dir)  # `star` appended after `dots`
    assert (run_dir / "requests.yaml").read_text() == two_requests.read_text()
    with pytest.raises(SystemExit, match="not the beginning of"):
        prepare_run_dir(cfg, first, run_dir)  # a request dropped
    reordered = tmp_path / "reordered.yaml"
    reordered.write_text("requests:\n  - {concept: star, kind: object}\n  - {concept: dots, kind: style}\n")
    with pytest.raises(SystemExit, match="not the beginning of"):
        prepare_run_dir(cfg, reordered, run_dir)
    assert (run_dir / "requests.yaml").read_text() == two_requests.read_text()  # nothing overwritten


def test_later_steps_are_planned_with_the_neighbours_and_targets_earlier_steps_chose(tmp_path):
    earlier = [Request("dots", "style", targets=["sketch", "neon"]), Request("star", "object")]
    chosen = [({"chosen": ["big dots"]}, {"counts": {"pastel color": 27}}), ({"chosen": ["cross"]}, {"counts": {}})]
    for index, (request, (neighbors, targets)) in enumerate(zip(earlier, chosen), start=1):
        folder = step_dir(tmp_path, index, request.concept) / "pipeline"
        folder.mkdir(parents=True)
        (folder / RECORD_FILE).write_text(json.dumps({"neighbors": neighbors, "targets": targets}))
    dots, star = as_carried_out(tmp_path, earlier)
    assert (dots.neighbors, dots.targets) == (["big dots"], ["pastel color"])  # the chosen target, not the candidates
    assert (star.neighbors, star.targets) == (["cross"], [])  # ESD maps onto no target


def test_the_loop_tells_each_step_which_concepts_later_requests_will_forget(tmp_path, monkeypatch, random_judge):
    requests = tmp_path / "requests.yaml"
    requests.write_text("requests:\n  - {concept: cross, kind: object}\n  - {concept: dots, kind: style}\n"
                        "  - {concept: triangle, kind: object}\n")  # fmt: skip
    seen = []

    class Stop(Exception):
        pass

    def first_step(*_args, pending=(), **_kwargs):
        seen.append(list(pending))
        raise Stop

    monkeypatch.setattr(loop, "run_step", first_step)
    with pytest.raises(Stop):
        loop.main([f"requests={requests}", f"run_dir={tmp_path / 'run'}", f"judge={random_judge}", *FAST,
                   "evaluate_every_step=false"])  # fmt: skip
    assert seen == [["dots", "triangle"]]


def test_chain_and_plan_overrides_come_from_the_command_line_and_are_checked_before_any_work():
    def settings(*argv):
        return load_config("train", list(argv), sections=("step", "evaluate"))

    cfg = settings("step.target.chain_overrides.forget_overshoot=1.0", "step.target.chain_overrides.lr=2e-4")
    assert dict(cfg.step.target.chain_overrides) == {"forget_overshoot": 1.0, "lambda_forgotten": 25.0, "lr": 2e-4}
    loop.check_loop_settings(cfg)
    loop.check_loop_settings(settings("step.target.chain_overrides=null"))  # none
    with pytest.raises(SystemExit, match="chain_overrides: 'forget_overshot' is not a step setting"):
        loop.check_loop_settings(settings("step.target.chain_overrides={forget_overshot: 0.5}"))
    with pytest.raises(SystemExit, match="unknown setting"):  # only an empty-by-default mapping is free-form
        settings("step.target.reuse.x=1")
    with pytest.raises(SystemExit, match=r"between_overrides: \['target'\] decide the plan"):
        loop.check_loop_settings(settings("step.target.between_overrides.target.protect=1"))
    with pytest.raises(SystemExit, match=r"close_overrides: \['seed'\] decide the plan"):
        loop.check_loop_settings(settings("step.neighbors.close_overrides.seed=3"))
    with pytest.raises(SystemExit, match="close_overrides: 'lambda_m' is not a step setting"):
        loop.check_loop_settings(settings("step.neighbors.close_overrides={lambda_m: 50.0}"))


def test_a_held_out_paraphrase_may_be_read_by_the_evaluation_and_only_then():
    from distill_forget.requests import Request
    from distill_forget.world.concepts import PARAPHRASE_TEMPLATES

    held = PARAPHRASE_TEMPLATES[1]
    requests = [Request("dots", "style"), Request("star", "object", overrides={"held_out_paraphrases": []})]

    def settings(*argv):
        return load_config("train", [f"evaluate.templates=['{held}']", *argv], sections=("step", "evaluate"))

    with pytest.raises(SystemExit, match=f"request 'dots' trains in {held!r}"):
        loop.check_evaluation_sentences(settings(), requests[:1])
    loop.check_evaluation_sentences(settings(f"step.held_out_paraphrases=['{held}']"), requests[:1])
    with pytest.raises(SystemExit, match=f"request 'star' trains in {held!r}"):  # its own overrides read too
        loop.check_evaluation_sentences(settings(f"step.held_out_paraphrases=['{held}']"), requests)
    with pytest.raises(SystemExit, match="request 'dots': held_out_paraphrases: 'a dot' is not one of the world's"):
        loop.check_evaluation_sentences(settings("step.held_out_paraphrases=['a dot']"), requests[:1])


def test_the_loop_reads_each_request_in_more_sentences_and_keeps_them_to_the_run(tiny_pipeline_dir, tmp_path,
                                                                                  random_judge):  # fmt: skip
    """`evaluate.templates`: every step's metrics pooled and per sentence against the base model's in that
    sentence; a rerun asking other sentences, and a sentence a step trains in, are refused before any work."""
    from distill_forget.world.concepts import EVAL_TEMPLATE, PARAPHRASE_TEMPLATES

    drawing = "a drawing of a {object} in {style} style"
    requests = tmp_path / "requests.yaml"
    requests.write_text("requests:\n  - {concept: dots, kind: style}\n")
    run_dir = tmp_path / "run"
    args = [f"model={tiny_pipeline_dir}", f"judge={random_judge}", f"requests={requests}", f"run_dir={run_dir}",
            *FAST, "step.steps=2"]  # fmt: skip
    finish([*args, f"evaluate.templates=['{drawing}']"])
    step = json.loads((run_dir / "report.json").read_text())["steps"][0]
    read = step["by_sentence"]
    assert list(read) == [EVAL_TEMPLATE, drawing]
    base = json.loads((run_dir / "base" / "metrics.json").read_text())
    for sentence, metrics in base["by_sentence"].items():  # the base model's images in that very sentence
        drawn = read[sentence]["base_metrics"]
        assert [drawn["object_accuracy"], drawn["style_accuracy"]] == [metrics["object_accuracy"],
                                                                       metrics["style_accuracy"]]  # fmt: skip
        assert drawn["nra"] is not None and drawn["quality"] is not None  # over `dots`' neighbours and the rest
    assert json.loads((run_dir / "steps" / "01-dots" / "metrics.json").read_text())["by_sentence"] == {
        t: r["metrics"] for t, r in read.items()
    }
    assert f"| 1 | {drawing} |" in (run_dir / "report.md").read_text()

    proc = train(args)  # the default: the evaluation's sentence alone
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "use another run_dir" in out and drawing in out

    trained = PARAPHRASE_TEMPLATES[0]
    proc = train([*args[:3], f"run_dir={tmp_path / 'other'}", *FAST, f"evaluate.templates=['{trained}']"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and f"request 'dots' trains in {trained!r}" in out
    assert not (tmp_path / "other" / "base").exists()
