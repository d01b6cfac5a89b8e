"""`python -m distill_forget.bench` on a micro model: two methods, two requests, a rerun that reuses them."""

import json

import pytest
import torch

from distill_forget import bench
from distill_forget.config import CONFIG_DIR, load_config
from distill_forget.ledger import Ledger

FAST = [
    "threads=1", "step.steps=2", "step.replay.bank_size=2", "step.sampling_steps=2", "step.score.latents=2",
    "step.batch=2", "step.target.mode=fixed", "step.neighbors.mode=request", "evaluate.seeds=[0]",
    "evaluate.sampling_steps=2", "evaluate.guidance_scale=1.0",
    "evaluate.reference_repeats=1", "wandb.mode=disabled",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """The loop sets torch's thread count for the process (threads=1 here); put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_writes_results_and_a_rerun_reuses_finished_runs(
    tiny_pipeline_dir, tmp_path, capsys, random_judge, two_requests
):
    judge, requests = random_judge, two_requests
    out = tmp_path / "bench"
    args = [f"model={tiny_pipeline_dir}", f"judge={judge}", f"requests={requests}", f"out={out}",
            "methods=[distill,ablation-ties]", "jobs=1", *FAST]  # fmt: skip

    bench.main(args)
    first = capsys.readouterr().out
    assert first.count("[base] evaluating the starting model") == 1  # evaluated once, shared by both methods
    result = json.loads((out / "bench.json").read_text())
    assert list(result["methods"]) == ["distill", "ablation-ties"]
    for name, method in result["methods"].items():
        assert [s["concept"] for s in method["steps"]] == ["dots", "star"], name
        for step in method["steps"]:
            assert set(step["metrics"]) == {"ua", "ira", "cra", "nra", "quality"}
            assert step["seconds"] > 0 and step["cumulative_seconds"] >= step["seconds"]
            assert step["threads"] == 1  # what the seconds were spent with (FAST: threads=1)
        assert method["base"] == result["methods"]["distill"]["base"]  # same prompts, seeds and judge
    # the merged method: independent students from the base, merged with TIES after each request
    ties = Ledger(out / "ablation-ties" / "ledger.jsonl").verify()
    assert [r["setting"] for r in ties] == ["independent"] * 2 and ties[1]["input_hash"] == ties[0]["input_hash"]
    assert ties[1]["settings"]["forget_objective"] == "ablation" and ties[1]["settings"]["lambda_r"] == 0.0
    assert ties[1]["merge"]["method"] == "ties" and len(ties[1]["merge"]["students"]) == 2
    assert ties[1]["merge"]["independent_hash"] != ties[1]["output_hash"]
    assert "Setting: independent." in (out / "ablation-ties" / "report.md").read_text()
    assert result["methods"]["ablation-ties"]["steps"][1]["metrics"]["ua"] is not None
    assert Ledger(out / "distill" / "ledger.jsonl").verify()[1]["input_hash"] != ties[1]["input_hash"]  # sequential
    markdown = (out / "bench.md").read_text()
    assert "| distill | sequential |" in markdown and "| ablation-ties | independent |" in markdown
    main_rows = ("| distill | sequential |", "| ablation-ties | independent |")
    rows = [row for row in markdown.splitlines() if row.startswith(main_rows)]
    assert len(rows) == 2 and all(row.endswith(" | 1 |") for row in rows)  # the threads column
    assert bench.threads_cell([{"threads": 2}, {"threads": 1}, {}]) == "1-2" and bench.threads_cell([{}]) == "-"
    assert "## UA" in markdown and "cumulative cost" in markdown
    given = [a for a in FAST if not a.startswith("threads=")]  # the settings of the runs, not the bench's own
    assert result["command_line"] == given  # a method's description names its file's settings only
    assert "Set on the command line for every method, over its file: " + " ".join(f"`{a}`" for a in given) in markdown
    for name, method in result["methods"].items():  # the whole curve, in the json and as its own table
        uas = [s["metrics"]["ua"] for s in method["steps"]]
        assert method["over_requests"]["ua_mean"] == round(sum(uas) / 2, 1), name
        assert f"| {name} | 2 | {method['over_requests']['ua_mean']:.1f} |" in markdown
    assert (out / "bench.png").stat().st_size > 0

    bench.main(args)
    again = capsys.readouterr().out
    assert again.count("done before, weights verified") == 4  # 2 methods x 2 requests, none redone
    assert "forgetting" not in again and "[base] evaluating" not in again

    # two methods at a time, each loop in its own process: the same results
    parallel = tmp_path / "parallel"
    bench.main([*args, f"out={parallel}", "jobs=2"])
    log = capsys.readouterr().out
    assert log.count("[base] evaluating the starting model") == 1 and log.count(" done in ") == 2
    assert (parallel / "ablation-ties" / "bench.log").read_text().count("forgetting") == 2
    together = json.loads((parallel / "bench.json").read_text())
    assert together["jobs"] == 2 and list(together["methods"]) == ["distill", "ablation-ties"]
    for name, method in together["methods"].items():
        assert [s["metrics"] for s in method["steps"]] == [s["metrics"] for s in result["methods"][name]["steps"]], name
        assert method["base"] == result["methods"][name]["base"]


def test_bench_refuses_a_method_that_changes_the_evaluation(tmp_path, monkeypatch):
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "cheat.yaml").write_text("evaluate: {seeds: [5]}\n")
    monkeypatch.setattr(bench, "METHODS_DIR", methods)
    with pytest.raises(SystemExit, match=r"cheat.yaml: \['evaluate'\] cannot be set by a method"):
        bench.main(["methods=[cheat]", f"out={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match="method 'nowhere': no file"):
        bench.main(["methods=[nowhere]", f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_a_method_inherits_the_settings_of_the_file_it_names(tmp_path, monkeypatch):
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "_plain.yaml").write_text("step: {steps: 150, lambda_r: 0.0, target: {chain_overrides: null}}\n")
    (methods / "parent.yaml").write_text("description: parent\ninherit: _plain\nstep: {forget_objective: ablation}\n")
    (methods / "child.yaml").write_text(
        "description: child\ninherit: parent\nsetting: independent\nstep: {steps: 50}\n"
    )
    monkeypatch.setattr(bench, "METHODS_DIR", methods)
    assert bench.method_files() == ["child", "parent"]  # `_plain` is a base, not a method
    with pytest.raises(SystemExit, match="'_plain' is a base that method files inherit, not a method"):
        bench.load_method("_plain")
    description, args = bench.load_method("child")
    assert description == "child"
    assert sorted(args) == sorted(["setting=\"independent\"", "step.steps=50", "step.lambda_r=0.0",
                                   "step.target.chain_overrides=null",
                                   "step.forget_objective=\"ablation\""])  # fmt: skip

    (methods / "loop.yaml").write_text("inherit: round\n")
    (methods / "round.yaml").write_text("inherit: loop\n")
    with pytest.raises(SystemExit, match="goes round in a circle: loop -> round -> loop"):
        bench.load_method("loop")
    (methods / "orphan.yaml").write_text("inherit: _gone\n")
    with pytest.raises(SystemExit, match="method 'orphan' inherits '_gone': no file"):
        bench.load_method("orphan")
    (methods / "_cheat.yaml").write_text("evaluate: {seeds: [5]}\n")
    (methods / "heir.yaml").write_text("inherit: _cheat\n")
    with pytest.raises(SystemExit, match=r"_cheat.yaml: \['evaluate'\] cannot be set by a method"):
        bench.load_method("heir")


def test_the_shipped_baselines_are_naive_and_distill_keeps_its_defaults():
    for name in bench.method_files():
        _, args = bench.load_method(name)
        cfg = load_config("train", args, sections=("step", "evaluate"))
        if name == "distill":
            assert args == [] and cfg.step.lambda_r > 0 and cfg.step.target.chain_overrides is not None
            assert cfg.step.neighbors.close_margin > 0
            continue
        step = cfg.step
        assert (step.lambda_r, step.lambda_n, step.lambda_forgotten, step.lambda_reg) == (0, 0, 0, 0), name
        assert step.target.chain_overrides is None and step.neighbors.close_margin == 0 and step.steps == 150, name
        assert step.forget_objective in ("esd", "ablation"), name


def test_every_shipped_bench_config_names_methods_that_exist_and_settings_the_loop_takes():
    presets = sorted(p.stem for p in CONFIG_DIR.glob("bench-*.yaml"))
    assert "bench-esd" in presets and "bench-quick" in presets
    for preset in [None, *presets]:
        cfg = load_config("bench", [] if preset is None else [f"config={preset}"])
        for name in cfg.methods:
            _, args = bench.load_method(name)
            loop = load_config("train", [*args, *cfg.train], sections=("step", "evaluate"))
            if name.startswith("esd-x-") and loop.setting == "sequential":  # ESD-x with one regulariser on
                regs = loop.step.regularizers
                assert loop.step.forget_objective == "esd" and loop.step.trainable == "cross_attention", name
                on = [regs.l1sp.weight > 0, regs.l2sp.weight > 0, regs.selective.fraction > 0, regs.projection.enabled]
                assert sum(on) == 1, name


def test_the_sequence_summary_keeps_the_collapse_that_the_last_request_hides():
    def step(index, ua, ira, nra):
        return {"index": index, "setting": "sequential", "cumulative_seconds": index,
                "metrics": {"ua": ua, "ira": ira, "cra": ira, "nra": nra, "quality": None},
                "relative_to_base": {"ira_rel": ira, "cra_rel": ira, "nra_rel": nra}}  # fmt: skip

    collapsed_and_back = [step(1, 100.0, 90.0, None), step(2, 50.0, 40.0, 80.0), step(3, 75.0, 95.0, 100.0)]
    summary = bench.over_requests(collapsed_and_back)
    assert summary["ua_mean"] == 75.0 and summary["ira_rel_mean"] == 75.0 and summary["ira_rel_min"] == 40.0
    assert summary["nra_rel_mean"] == 90.0 and summary["nra_rel_min"] == 80.0  # an unmeasured request is left out
    assert bench.over_requests([step(1, None, None, None)]) == dict.fromkeys(summary)  # nothing measured: None, not 0
    markdown = bench.format_markdown(
        {"requests": "r.yaml", "methods": {"m": {"description": "d", "base": {}, "steps": collapsed_and_back}}}
    )
    assert "| m | 3 | 75.0 | 75.0 / 75.0 / 90.0 | 40.0 / 40.0 / 80.0 |" in markdown
