"""share_sweep: a step's models between its teacher (share 0) and itself (share 1), evaluated as the loop does."""

import subprocess
import sys

import pytest
from test_train import FAST

from distill_forget.ledger import Ledger
from distill_forget.share_sweep import main, sweep


def test_share_zero_is_the_teacher_and_share_one_the_saved_step(tiny_pipeline_dir, random_judge, tmp_path):
    requests = tmp_path / "requests.yaml"
    requests.write_text("requests:\n  - {concept: dots, kind: style}\n")
    run_dir = tmp_path / "run"
    # a random judge: on a random model the shipped one reads nothing, so retention % of base would be undefined
    args = [f"model={tiny_pipeline_dir}", f"judge={random_judge}", f"requests={requests}", f"run_dir={run_dir}", *FAST]
    command = [sys.executable, "-m", "distill_forget.train", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = Ledger(run_dir / "ledger.jsonl").records()[0]

    teacher, _, step = sweep(run_dir, "01-dots", [0.0, 0.5, 1.0])  # 0.5: merging.merge_states (its own tests)
    # share 0 is the base model itself here (the first step's teacher): the same images as the base evaluation
    assert teacher["ira_rel"] == teacher["cra_rel"] == 100.0 and teacher["quality_vs_base"] == 0.0
    # share 1 is the saved student: the figures the loop recorded for it
    assert step["ua"] == record["metrics"]["ua"]
    assert step["quality"] == pytest.approx(record["metrics"]["quality"], abs=1e-4)
    assert step["ira_rel"] == pytest.approx(100.0 * record["metrics"]["ira"] / record["base_metrics"]["ira"], abs=0.01)

    with pytest.raises(SystemExit, match="has no finished step '02-star' \\(it has: 01-dots\\)"):
        sweep(run_dir, "02-star", [1.0])
    with pytest.raises(SystemExit, match="must lie in"):
        main([str(run_dir), "01-dots", "--shares", "1.5"])


def test_a_folder_without_a_run_config_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r"is not a run folder of python -m distill_forget\.train \(no config\.yaml\)"):
        main([str(tmp_path), "01-dots"])
    with pytest.raises(SystemExit, match="is not a run folder"):
        sweep(tmp_path, "01-dots", [1.0])
