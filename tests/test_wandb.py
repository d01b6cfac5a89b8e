"""W&B, offline: one run per sequence with losses, lr, per-request metrics, grids and the ledger."""

import json
import os
import subprocess
import sys

FAST = [
    "threads=1", "step.steps=3", "step.replay.bank_size=2", "step.sampling_steps=2", "step.score.latents=2",
    "step.batch=2", "step.target.mode=fixed", "step.neighbors.mode=request", "evaluate.seeds=[0]",
    "evaluate.sampling_steps=1", "evaluate.reference_repeats=1",
]  # fmt: skip
DRAWING = "a drawing of a {object} in {style} style"  # evaluate.templates: a curve per sentence


def test_the_loop_logs_one_offline_wandb_run_per_sequence(tiny_pipeline_dir, tmp_path, two_requests):
    requests = two_requests
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    env = {**os.environ, "WANDB_DIR": str(wandb_dir), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
           "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_CONFIG_DIR": str(tmp_path / "config")}  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)  # mode auto: offline without an API key
    args = [sys.executable, "-m", "distill_forget.train", f"model={tiny_pipeline_dir}", f"requests={requests}",
            f"run_dir={run_dir}", *FAST, f"evaluate.templates=['{DRAWING}']"]  # fmt: skip
    for _ in range(2):  # the second time every request is done: the same W&B run is resumed
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert "(offline)" in proc.stdout

    run_id = (run_dir / "wandb_id").read_text().strip()
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    first = runs[0]
    logged = (first / f"run-{run_id}.wandb").read_bytes()
    for key in (b"loss/forget", b"loss/retain", b"loss/total", b"grad_norm", b"lr-AdamW", b"request/ua", b"request/ira",
                b"request/quality_vs_base", b"metrics_table", f"ledger-{run_id}".encode(),
                f"request/{DRAWING}/nra".encode()):  # fmt: skip
        assert key in logged, key
    grids = sorted((first / "files" / "media" / "images").glob("grid_*.png"))
    tables = sorted((first / "files" / "media" / "table").glob("metrics_table_*.table.json"))
    assert len(grids) == 2 and len(tables) == 2  # one per request
    for path in tables:  # each row says where its request's concept went: "big dots 12", not "-"
        table = json.loads(path.read_text())
        assert all(row[table["columns"].index("read_as")] not in (None, "-") for row in table["data"])
    assert b"request/ua" not in (runs[1] / f"run-{run_id}.wandb").read_bytes()  # done requests are not logged again
