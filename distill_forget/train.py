"""Distill-Forget-Repeat: run a whole sequence of unlearning requests.

    python -m distill_forget.train [requests=FILE] [run_dir=DIR] [model=FOLDER] [step.KEY=VALUE ...]

Request after request, the student of request i becomes the teacher of request i+1 (one
Lightning `Trainer.fit` each). Every step leaves a complete pipeline folder, the changed
weights alone, its metrics and an image grid under `RUN_DIR/steps/<i>-<concept>/`; the audit
ledger `RUN_DIR/ledger.jsonl` chains one record per finished request; `report.json`,
`report.md` and plots are rewritten after every request. Rerunning the same command on the
same run folder skips finished requests (their weights verified against the ledger) and
resumes the unfinished one from its last Lightning checkpoint.
"""

import json
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from distill_forget.config import load_config, resolve_model_dir
from distill_forget.distill.step import run_step
from distill_forget.evaluate import evaluate_pipeline, load_judge, retained_quality, save_grid_png
from distill_forget.ledger import Ledger, LedgerError, step_dir, utc_now, weights_hash
from distill_forget.metrics import compute_metrics
from distill_forget.pipelines import load_pipeline, pick_device
from distill_forget.report import write_report
from distill_forget.requests import RequestFileError, check_minicanvas, load_requests
from distill_forget.storage import atomic_file, torch_load, torch_save, write_json

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def save_changed_weights(teacher_dir: Path, student_dir: Path, path: Path) -> int:
    """The student UNet's tensors that differ from the teacher's, alone; returns their count."""
    teacher, student = load_file(teacher_dir / UNET_WEIGHTS), load_file(student_dir / UNET_WEIGHTS)
    changed = {name: t.contiguous() for name, t in student.items() if not torch.equal(t, teacher[name])}
    with atomic_file(path) as tmp:
        save_file(changed, str(tmp))
    return len(changed)


def prepare_run_dir(cfg, requests_path: Path, run_dir: Path) -> None:
    """Save the merged config and the request file; refuse a run folder made for other requests."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "requests.yaml"
    if saved.exists() and saved.read_text() != requests_path.read_text():
        raise SystemExit(
            f"{run_dir} was started with other requests ({saved} differs from {requests_path}); "
            "use another run_dir, or the same request file to resume"
        )
    if not saved.exists():
        with atomic_file(saved) as tmp:
            shutil.copyfile(requests_path, tmp)
    with atomic_file(run_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp)


def evaluation_for(records_so_far: list[dict]) -> dict:
    """Which concepts count as forgotten and as replayed after these steps."""
    forgotten = [r["request"]["concept"] for r in records_so_far]
    replayed = sorted({c for r in records_so_far for c in r.get("replayed_concepts", [])} - set(forgotten))
    return {"forgotten": forgotten, "replayed": replayed}


def evaluate_step(pipe_dir: Path, judge, cfg, sets: dict, out_dir: Path, device, keep_images=False) -> dict:
    pipe = load_pipeline(pipe_dir, device)
    result, images = evaluate_pipeline(pipe, judge, cfg.evaluate, sets["forgotten"], None, sets["replayed"])
    if keep_images:  # the base model's, to measure its quality over each step's retained prompts
        torch_save(images, out_dir / "images.pt")
    write_json(out_dir / "metrics.json", result)
    save_forget_retain_grid(images, result, out_dir / "grid.png")
    return result


def base_metrics_for(run_dir: Path, base: dict, judge, cfg, sets: dict, neighbors) -> dict:
    """The base model's metrics over a step's forgotten, neighbour and replayed sets."""
    matched = compute_metrics(base["judged"], judge.domains, sets["forgotten"], neighbors, sets["replayed"])["metrics"]
    images = torch_load(run_dir / "base" / "images.pt", "base model images")
    prompts = [record["prompt"] for record in base["judged"]]
    return {**matched, "quality": retained_quality(judge, images, prompts, sets["forgotten"], cfg.evaluate)}


def save_forget_retain_grid(images: torch.Tensor, result: dict, path: Path) -> None:
    """First rows: images of prompts naming a forgotten concept; then the retained ones (first seed)."""
    first_seed = [i for i, r in enumerate(result["judged"]) if r["seed"] == result["judged"][0]["seed"]]
    forgotten = set(result["forgotten"])
    names = lambda i: set(result["judged"][i]["prompt"].values())  # noqa: E731
    forget_rows = [i for i in first_seed if names(i) & forgotten]
    retain_rows = [i for i in first_seed if not names(i) & forgotten]
    save_grid_png(images[forget_rows + retain_rows], path)


def main(argv=None) -> None:
    cfg = load_config("train", argv, __doc__, sections=("step", "evaluate"))
    torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    requests_path = Path(cfg.requests)
    try:
        requests = load_requests(requests_path, cfg.step)
        if cfg.step.world == "minicanvas":
            check_minicanvas(requests)
    except RequestFileError as err:
        raise SystemExit(f"bad request file: {err}") from None
    model_dir = resolve_model_dir(cfg.model)
    prepare_run_dir(cfg, requests_path, run_dir)
    device = pick_device(cfg.evaluate.device)
    judge = load_judge(cfg.judge)
    ledger = Ledger(run_dir / "ledger.jsonl")
    try:
        records = ledger.verify() if ledger.path.exists() else []
    except LedgerError as err:
        raise SystemExit(f"the run's ledger does not verify: {err}") from None
    if len(records) > len(requests):
        raise SystemExit(f"{ledger.path} has {len(records)} records but {requests_path} only {len(requests)} requests")
    print(f"run {run_dir}: {len(requests)} requests, {len(records)} already done; starting model {model_dir}", flush=True)

    if cfg.evaluate_every_step and load_base(run_dir) is None:
        print("[base] evaluating the starting model", flush=True)
        evaluate_step(model_dir, judge, cfg, {"forgotten": [], "replayed": None}, run_dir / "base", device, keep_images=True)
    base = load_base(run_dir)

    teacher_dir, step_rows = model_dir, []
    for index, request in enumerate(requests, start=1):
        folder = step_dir(run_dir, index, request.concept)
        pipeline_dir = folder / "pipeline"
        if index <= len(records):
            record = records[index - 1]
            if record["request"]["concept"] != request.concept:
                raise SystemExit(f"ledger record {index} forgot {record['request']['concept']!r}, "
                                 f"but request {index} is {request.concept!r}: the run folder belongs to other requests")  # fmt: skip
            try:
                ledger.verify_weights(index, pipeline_dir)
            except (LedgerError, FileNotFoundError) as err:
                raise SystemExit(f"refusing to continue from step {index}: {err}") from None
            print(f"[{index}/{len(requests)}] {request.concept!r}: done before, weights verified", flush=True)
        else:
            record = run_request(cfg, index, request, requests, teacher_dir, folder, records, judge, device)
            record = ledger.append(record)
            records.append(record)
        teacher_dir = pipeline_dir
        step_rows.append(report_row(record))
        if base is not None:  # the base row over the latest set of forgotten concepts
            write_report(run_dir, {"metrics": record.get("base_metrics") or base["metrics"]}, step_rows)
    print(f"all {len(requests)} requests done; final model {teacher_dir}; report {run_dir / 'report.md'}; "
          f"ledger {ledger.path} (check it with: python -m distill_forget.ledger {run_dir})")  # fmt: skip


def run_request(cfg, index, request, requests, teacher_dir, folder, records, judge, device) -> dict:
    print(f"[{index}/{len(requests)}] forgetting {request.concept!r} ({request.kind}) from {teacher_dir}", flush=True)
    started = utc_now()
    t0 = time.time()
    pipeline_dir = folder / "pipeline"
    step_record = run_step(
        teacher_dir, request, cfg.step, pipeline_dir, forgotten_before=requests[: index - 1],
        checkpoint_dir=folder / "checkpoints",
    )  # fmt: skip
    seconds = round(time.time() - t0, 1)  # the request's cost, evaluation excluded
    changed = save_changed_weights(Path(teacher_dir), pipeline_dir, folder / "changed_weights.safetensors")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the step is whole: its pipeline folder replaces them
    record = {
        "index": index,
        "request": request.to_dict(),
        "settings": step_record["settings"],
        "started": started,
        "finished": utc_now(),
        "seconds": seconds,
        "targets": step_record["targets"],
        "neighbors": step_record["neighbors"],
        "replayed_concepts": step_record["replayed_concepts"],
        "held_out_concepts": step_record["held_out_concepts"],
        "evaluations": step_record["evaluations"],
        "changed_tensors": changed,
        "checkpoint": str(pipeline_dir.relative_to(folder.parent.parent)),
        "input_hash": weights_hash(teacher_dir),
        "output_hash": weights_hash(pipeline_dir),
        "metrics": {},
    }
    if cfg.evaluate_every_step:
        sets = evaluation_for([*records, record])
        result = evaluate_step(pipeline_dir, judge, cfg, sets, folder, device)
        base = load_base(folder.parent.parent)
        record["metrics"] = result["metrics"]
        if base is not None:
            record["base_metrics"] = base_metrics_for(folder.parent.parent, base, judge, cfg, sets, result["neighbors"])
        shown = {k: result["metrics"][k] for k in ("ua", "ira", "cra", "nra", "quality")}
        print(f"[{index}/{len(requests)}] {request.concept!r} done in {seconds:.0f} s; metrics {shown}", flush=True)
    return record


def load_base(run_dir: Path) -> dict | None:
    """The starting model's evaluation, with every image's judgement (None before it ran)."""
    path = run_dir / "base" / "metrics.json"
    if not (path.exists() and (run_dir / "base" / "images.pt").exists()):  # images: older runs lack them
        return None
    return json.loads(path.read_text())


def report_row(record: dict) -> dict:
    return {
        "index": record["index"],
        "concept": record["request"]["concept"],
        "kind": record["request"]["kind"],
        "metrics": record["metrics"],
        "base_metrics": record.get("base_metrics"),
        "seconds": record["seconds"],
        "checkpoint": record["checkpoint"],
        "output_hash": record["output_hash"],
    }


if __name__ == "__main__":
    main()
