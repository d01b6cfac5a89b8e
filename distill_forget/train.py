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

import dataclasses
import json
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from callbacks import WandbReport
from distill_forget.check import check_evaluation, check_settings, evaluate_base_check, train_checked
from distill_forget.config import LOOP_SECTIONS, load_config, resolve_model_dir
from distill_forget.distill.module import CheckpointError
from distill_forget.distill.prompts import trained_templates
from distill_forget.distill.step import RECORD_FILE, run_step, save_student, with_plan_overrides
from distill_forget.distributed import Ranks
from distill_forget.evaluate import (
    evaluate_pipeline,
    evaluation_sentences,
    load_judge,
    metrics_by_sentence,
    retained_quality_of,
    save_grid_png,
    sentence_of,
)
from distill_forget.ledger import Ledger, LedgerError, step_dir, utc_now, weights_hash
from distill_forget.merging import MERGE_METHODS, merge_states, unet_state
from distill_forget.metrics import compute_metrics
from distill_forget.pipelines import load_pipeline, pick_device, unet_weight_files
from distill_forget.report import format_counts, request_readings, write_report
from distill_forget.requests import RequestFileError, check_minicanvas, load_requests, merge_overrides, merge_settings
from distill_forget.storage import atomic_file, torch_load, torch_save, write_json
from distill_forget.world import concepts


def save_changed_weights(teacher_dir: Path, student_dir: Path, path: Path) -> int:
    """The student UNet's tensors that differ from the teacher's, alone; returns their count.

    Compared one tensor at a time, so a large UNet (SDXL's: 10 GB in float32, sharded) is never
    held in memory twice.
    """
    with ExitStack() as files:
        teacher = {}  # tensor name -> the open teacher file holding it
        for file in unet_weight_files(teacher_dir):
            handle = files.enter_context(safe_open(file, "pt"))
            teacher.update(dict.fromkeys(handle.keys(), handle))
        changed = {}
        for file in unet_weight_files(student_dir):
            student = files.enter_context(safe_open(file, "pt"))
            for name in student.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                tensor = student.get_tensor(name)
                if name not in teacher or not torch.equal(tensor, teacher[name].get_tensor(name)):
                    changed[name] = tensor.contiguous()
    with atomic_file(path) as tmp:
        save_file(changed, str(tmp))
    return len(changed)


def prepare_run_dir(cfg, requests_path: Path, run_dir: Path, write: bool = True) -> None:
    """Save the merged config and the request file (when `write`: rank 0).

    A run folder continues with the request file it was started with, or with that file's
    requests followed by new ones (requests keep coming: append them and rerun); any other
    request file is refused.
    """
    saved = run_dir / "requests.yaml"
    appended = saved.exists() and saved.read_text() != requests_path.read_text()
    if appended:
        before, now = load_requests(saved), load_requests(requests_path)
        if now[: len(before)] != before:
            raise SystemExit(
                f"{run_dir} was started with other requests ({saved} is not the beginning of {requests_path}); "
                "use another run_dir, or a request file that keeps those requests first, in order"
            )
        if write:
            print(
                f"run {run_dir}: {len(now) - len(before)} request(s) appended to the {len(before)} it was started with",
                flush=True,
            )
    if not write:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.exists() or appended:
        with atomic_file(saved) as tmp:
            shutil.copyfile(requests_path, tmp)
    with atomic_file(run_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp)


SETTINGS = ("sequential", "independent", "simultaneous")


def check_loop_settings(cfg) -> None:
    """`setting` and `merge`, refused before any work when they are not usable."""
    if cfg.setting not in SETTINGS:
        raise SystemExit(f"setting must be one of {', '.join(SETTINGS)} (got {cfg.setting!r})")
    if cfg.merge.method not in MERGE_METHODS:
        raise SystemExit(f"merge.method must be one of {', '.join(MERGE_METHODS)} (got {cfg.merge.method!r})")
    if cfg.merge.method != "none" and cfg.setting != "independent":
        raise SystemExit(f"merge.method={cfg.merge.method} merges independent runs: it needs setting=independent")
    chain = cfg.step.target.chain_overrides
    try:  # checked now, not when the sequence first reaches a chain
        merge_settings(cfg.step, OmegaConf.to_container(chain) if chain else {}, "step.target.chain_overrides")
        with_plan_overrides(cfg.step)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    check_settings(cfg)


def check_evaluation_sentences(cfg, requests) -> None:
    """Refuse an evaluation sentence (`evaluate.templates`) a step of this run trains in: retention is read
    in sentences no training prompt holds."""
    if cfg.step.world != "minicanvas":
        return
    sentences = evaluation_sentences(cfg.evaluate)[1:]
    for request in requests:
        try:
            trained = {concepts.spaced(t) for t in trained_templates(merge_overrides(cfg.step, request))}
        except ValueError as err:
            raise SystemExit(f"request {request.concept!r}: {err}") from None
        for sentence in sentences:
            if concepts.spaced(sentence) in trained:
                raise SystemExit(f"evaluate.templates: request {request.concept!r} trains in {sentence!r} "
                                 "(configs/step.yaml): the evaluation would read replayed prompts")  # fmt: skip


def evaluation_for(records_so_far: list[dict], setting: str = "sequential") -> dict:
    """Which concepts count as forgotten and as replayed after these steps.

    independent: the model after request i has forgotten request i's concept only.
    """
    if setting == "independent":
        records_so_far = records_so_far[-1:]
    forgotten = [r["request"]["concept"] for r in records_so_far]
    replayed = sorted({c for r in records_so_far for c in r.get("replayed_concepts", [])} - set(forgotten))
    return {"forgotten": forgotten, "replayed": replayed}


def evaluate_step(
    pipe_dir: Path, judge, cfg, sets: dict, out_dir: Path, device, keep_images=False, ranks=None
) -> dict | None:
    """Evaluate and write the results (rank 0); the other ranks draw their share of the images and get None."""
    pipe = load_pipeline(pipe_dir, device)
    result, images = evaluate_pipeline(pipe, judge, cfg.evaluate, sets["forgotten"], None, sets["replayed"], ranks)
    if result is None:
        return None
    if keep_images:  # the base model's, to measure its quality over each step's retained prompts
        torch_save(images, out_dir / "images.pt")
    write_json(out_dir / "metrics.json", result)
    save_forget_retain_grid(images, result, out_dir / "grid.png")
    return result


def evaluate_base(argv) -> None:
    """The starting model's evaluation alone, into RUN_DIR/base (the loop does it when it is missing)."""
    cfg = load_config("train", argv, sections=LOOP_SECTIONS)
    torch.set_num_threads(cfg.threads)
    print("[base] evaluating the starting model", flush=True)
    sets = {"forgotten": [], "replayed": None}
    device = pick_device(cfg.evaluate.device)
    evaluate_step(
        resolve_model_dir(cfg.model), load_judge(cfg.judge), cfg, sets, Path(cfg.run_dir) / "base", device,
        keep_images=True,
    )


def base_metrics_for(run_dir: Path, base: dict, judge, cfg, sets: dict, neighbors) -> tuple[dict, dict]:
    """The base model's metrics over a step's forgotten, neighbour and replayed sets, and {sentence: those
    metrics} where it was drawn in more than one (`evaluate.templates`; {} otherwise)."""
    images = torch_load(run_dir / "base" / "images.pt", "base model images")
    judged, forgotten = base["judged"], sets["forgotten"]
    quality = retained_quality_of(judge, forgotten, cfg.evaluate)
    matched = compute_metrics(judged, judge.domains, forgotten, neighbors, sets["replayed"])["metrics"]
    pooled = {**matched, "quality": quality(images, [record["prompt"] for record in judged])}
    return pooled, metrics_by_sentence(judge, judged, images, forgotten, neighbors, sets["replayed"], quality)


def check_drawn_as_now(kept: dict, evaluation, path: Path) -> None:
    """Refuse the starting model's judged images at `path` where they were drawn on other seeds or in other
    sentences than `evaluation` draws now: every step is compared with them image for image."""
    drawn = sorted({r["seed"] for r in kept["judged"]}), sorted({sentence_of(r) for r in kept["judged"]})
    now = sorted(int(s) for s in evaluation.seeds), sorted(evaluation_sentences(evaluation))
    if drawn != now:
        raise SystemExit(f"{path} holds the starting model's images on seeds {drawn[0]} in the sentences "
                         f"{drawn[1]}, but the evaluation now draws seeds {now[0]} in {now[1]}: every step is "
                         "compared with them image for image; use another run_dir, or the settings this run "
                         "started with")  # fmt: skip


def save_forget_retain_grid(images: torch.Tensor, result: dict, path: Path) -> None:
    """First rows: images of prompts naming a forgotten concept; then the retained ones (first seed)."""
    first_seed = [i for i, r in enumerate(result["judged"]) if r["seed"] == result["judged"][0]["seed"]]
    forgotten = set(result["forgotten"])
    names = lambda i: set(result["judged"][i]["prompt"].values())  # noqa: E731
    forget_rows = [i for i in first_seed if names(i) & forgotten]
    retain_rows = [i for i in first_seed if not names(i) & forgotten]
    save_grid_png(images[forget_rows + retain_rows], path)


def main(argv=None) -> None:
    cfg = load_config("train", argv, __doc__, sections=LOOP_SECTIONS)
    torch.set_num_threads(cfg.threads)
    ranks = Ranks.start(cfg.step.accelerator)  # processes come from torchrun / srun (launch/); rank 0 writes
    run_dir = Path(cfg.run_dir)
    requests_path = Path(cfg.requests)
    try:
        requests = load_requests(requests_path, cfg.step)
        if cfg.step.world == "minicanvas":
            check_minicanvas(requests)
    except RequestFileError as err:
        raise SystemExit(f"bad request file: {err}") from None
    model_dir = resolve_model_dir(cfg.model)
    check_loop_settings(cfg)
    try:
        check_evaluation_sentences(cfg, requests)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    started_with = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
    prepare_run_dir(cfg, requests_path, run_dir, write=ranks.is_main)
    ranks.barrier()
    device = pick_device(cfg.evaluate.device)
    judge = load_judge(cfg.judge)
    ledger = Ledger(run_dir / "ledger.jsonl")
    try:
        records = ledger.verify() if ledger.path.exists() else []
    except LedgerError as err:
        raise SystemExit(f"the run's ledger does not verify: {err}") from None
    if len(records) > len(requests):
        raise SystemExit(f"{ledger.path} has {len(records)} records but {requests_path} only {len(requests)} requests")
    say = print if ranks.is_main else lambda *args, **kwargs: None
    say(f"run {run_dir}: {len(requests)} requests ({cfg.setting}), {len(records)} already done; "
        f"starting model {model_dir}; {ranks.world} process(es)", flush=True)  # fmt: skip
    report = WandbReport.start(cfg, run_dir) if ranks.is_main else None

    if cfg.evaluate_every_step and ranks.broadcast(load_base(run_dir) is None):
        say("[base] evaluating the starting model", flush=True)
        base_sets = {"forgotten": [], "replayed": None}
        evaluate_step(model_dir, judge, cfg, base_sets, run_dir / "base", device, keep_images=True, ranks=ranks)
    if cfg.check.retries and ranks.broadcast(not (run_dir / "base" / "check.json").exists()):
        say(f"[base] the starting model on the check seeds {list(cfg.check.seeds)}", flush=True)
        evaluate_base_check(model_dir, judge, cfg, run_dir / "base" / "check.json", device, ranks)
    ranks.barrier()
    base = load_base(run_dir)
    if base is not None:
        check_drawn_as_now(base, cfg.evaluate, run_dir / "base" / "metrics.json")
    if cfg.check.retries:
        check_path = run_dir / "base" / "check.json"
        check_drawn_as_now(json.loads(check_path.read_text()), check_evaluation(cfg), check_path)

    teacher_dir, step_rows = model_dir, []
    for index, request in enumerate(requests, start=1):
        folder = step_dir(run_dir, index, request.concept)
        pipeline_dir = folder / "pipeline"
        if index <= len(records):
            record = records[index - 1]
            if record["request"]["concept"] != request.concept:
                raise SystemExit(f"ledger record {index} forgot {record['request']['concept']!r}, "
                                 f"but request {index} is {request.concept!r}: "
                                 "the run folder belongs to other requests")  # fmt: skip
            try:
                ledger.verify_weights(index, pipeline_dir)
            except (LedgerError, FileNotFoundError) as err:
                raise SystemExit(f"refusing to continue from step {index}: {err}") from None
            say(f"[{index}/{len(requests)}] {request.concept!r}: done before, weights verified", flush=True)
            new = False
        else:
            new = True
            if cfg.setting != "sequential":  # every request starts from the starting model
                teacher_dir = model_dir
            try:
                record = run_request(
                    cfg, index, request, requests, teacher_dir, folder, records, judge, device, model_dir, ranks, report
                )  # fmt: skip
            except CheckpointError as err:  # the finished requests stay as they are, and the config they ran with
                if ranks.is_main and started_with is not None:
                    with atomic_file(run_dir / "config.yaml") as tmp:
                        tmp.write_text(started_with)
                raise SystemExit(f"[{index}/{len(requests)}] {request.concept!r}: {err}") from None
            if ranks.is_main:
                record = ledger.append(record)
            ranks.barrier()  # the next request reads this one's folder
            records.append(record)
        teacher_dir = pipeline_dir
        if not ranks.is_main:
            continue
        step_rows.append(report_row(record))
        base_metrics = record.get("base_metrics") or (base or {}).get("metrics")  # the base over this step's pairs
        if base is not None:
            write_report(run_dir, {"metrics": base_metrics}, step_rows)
        if report is not None:
            # logged once, by the job that ran it
            report.request_done(record, folder, ledger.path, base_metrics, log=new)
    if report is not None:
        report.finish()
    say(f"all {len(requests)} requests done; final model {teacher_dir}; report {run_dir / 'report.md'}; "
        f"ledger {ledger.path} (check it with: python -m distill_forget.ledger {run_dir})")  # fmt: skip


def as_carried_out(run_dir: Path, earlier: list) -> list:
    """Earlier requests with the neighbours and targets their steps chose (read from each step's
    record, which every process can read): later steps keep replaying those neighbours and do
    not map onto those targets again (`step.target.reuse`)."""
    carried_out = []
    for index, request in enumerate(earlier, start=1):
        record = json.loads((step_dir(run_dir, index, request.concept) / "pipeline" / RECORD_FILE).read_text())
        chosen = {"neighbors": list(record["neighbors"]["chosen"]), "targets": list(record["targets"]["counts"])}
        carried_out.append(dataclasses.replace(request, **chosen))
    return carried_out


def run_request(cfg, index, request, requests, teacher_dir, folder, records, judge, device, model_dir,
                ranks=None, report=None) -> dict | None:  # fmt: skip
    """One request on every rank; its ledger record on rank 0, None on the others."""
    ranks = ranks or Ranks()
    if ranks.is_main:
        print(
            f"[{index}/{len(requests)}] forgetting {request.concept!r} ({request.kind}) from {teacher_dir}", flush=True
        )
    started = utc_now()
    t0 = time.time()
    pipeline_dir = folder / "pipeline"
    earlier = requests[: index - 1]
    if cfg.setting == "sequential":
        earlier = as_carried_out(folder.parent.parent, earlier)
    merging = cfg.merge.method != "none"  # the student is then one of the models merged into pipeline_dir
    student_dir = folder / "independent" if merging else pipeline_dir
    step_kwargs = {
        "base_dir": model_dir,
        "logger": report.logger if report is not None else None,
        "forgotten_before": earlier if cfg.setting == "sequential" else (),
        "forget_together": earlier if cfg.setting == "simultaneous" else (),
        "pending": [r.concept for r in requests[index:]] if cfg.setting == "sequential" else (),
    }
    checked = None  # the check's attempts (`check.retries`)
    trained_earlier = 0.0  # seconds spent before t0: by an earlier, killed run, or on the check's attempts
    if cfg.check.retries:
        say = print if ranks.is_main else lambda *args, **kwargs: None
        step_record, checked, trained_earlier = train_checked(
            cfg, request, teacher_dir, folder, judge, device, ranks,
            lambda attempt: evaluation_for([*records, attempt]), step_kwargs,
            lambda student: trained_before(student, request, teacher_dir), say,
        )  # fmt: skip
        t0 = time.time()
    elif (step_record := trained_before(student_dir, request, teacher_dir)) is not None:
        # killed after the student was saved (its checkpoints are gone), before its record
        if ranks.is_main:
            print(f"[{index}/{len(requests)}] {request.concept!r}: trained before the run stopped; its student is kept",
                  flush=True)  # fmt: skip
        trained_earlier = step_record["seconds"]["total"]
    else:
        step_record = run_step(teacher_dir, request, cfg.step, student_dir, checkpoint_dir=folder / "checkpoints",
                               **step_kwargs)  # fmt: skip
    if merging and ranks.is_main:
        students = [
            step_dir(folder.parent.parent, k, r.concept) / "independent" for k, r in enumerate(requests[:index], 1)
        ]
        merged = merge_students(cfg.merge, Path(model_dir), students, pipeline_dir)
    ranks.barrier()
    seconds = round(time.time() - t0 + trained_earlier, 1)  # the request's cost with its checks, without evaluation
    if not ranks.is_main:  # the others only draw their share of the evaluation's images
        if cfg.evaluate_every_step:
            evaluate_step(pipeline_dir, judge, cfg, {"forgotten": [], "replayed": None}, folder, device, ranks=ranks)
        return None
    changed = save_changed_weights(Path(teacher_dir), pipeline_dir, folder / "changed_weights.safetensors")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the step is whole: its pipeline folder replaces them
    record = {
        "index": index,
        "request": request.to_dict(),
        "setting": cfg.setting,
        "settings": step_record["settings"],
        "started": started,
        "finished": utc_now(),
        "seconds": seconds,
        "threads": torch.get_num_threads(),  # the CPU threads the seconds were spent with
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
    if merging:
        record["merge"] = {**merged["merge"], "independent_hash": weights_hash(student_dir)}
    if checked is not None:
        record["check"] = checked
    if cfg.evaluate_every_step:
        sets = evaluation_for([*records, record], "merged" if merging else cfg.setting)
        result = evaluate_step(pipeline_dir, judge, cfg, sets, folder, device, ranks=ranks)
        base = load_base(folder.parent.parent)
        record["metrics"] = result["metrics"]
        base_by = {}  # evaluate.templates: the base model's metrics in each sentence
        if base is not None:
            record["base_metrics"], base_by = base_metrics_for(folder.parent.parent, base, judge, cfg, sets,
                                                               result["neighbors"])  # fmt: skip
        if "by_sentence" in result:  # evaluate.templates: each sentence's metrics, and the base model's there
            record["by_sentence"] = {sentence: {"metrics": metrics, "base_metrics": base_by.get(sentence)}
                                     for sentence, metrics in result["by_sentence"].items()}  # fmt: skip
        # Where each concept forgotten so far went: what the judge reads in its images.
        record["read_as"] = {c: result["per_concept"][c]["read_as"] for c in result["forgotten"]}
        shown = {k: result["metrics"][k] for k in ("ua", "ira", "cra", "nra", "quality")}
        print(f"[{index}/{len(requests)}] {request.concept!r} done in {seconds:.0f} s; metrics {shown}; its images "
              f"read as {format_counts(request_readings(record))}", flush=True)  # fmt: skip
    return record


def trained_before(student_dir: Path, request, teacher_dir) -> dict | None:
    """The step record of a student this request already trained from this teacher, else None.

    A step's student folder is written whole or not at all (`save_student`), so one that holds
    the record of this request and teacher is finished; a run killed while evaluating it goes on
    from there instead of training the request again.
    """
    path = Path(student_dir) / RECORD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    same_teacher = Path(record.get("teacher", "")).resolve() == Path(teacher_dir).resolve()
    return record if same_teacher and record.get("request") == request.to_dict() else None


def merge_students(merge_cfg, base_dir: Path, student_dirs: list[Path], out_dir: Path) -> dict:
    """The merge of independent students (pipeline folders), saved as a pipeline folder; its record."""
    print(f"[merge] {merge_cfg.method} of {len(student_dirs)} independent students", flush=True)
    base = unet_state(base_dir)
    merged = merge_states(
        base, [unet_state(d) for d in student_dirs], merge_cfg.method, merge_cfg.scale, merge_cfg.top_k
    )
    unet = load_pipeline(base_dir).unet
    unet.load_state_dict(merged)
    record = {"merge": {**OmegaConf.to_container(merge_cfg), "students": [str(d) for d in student_dirs]}}
    save_student(unet, base_dir, out_dir, record)
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
        "setting": record.get("setting", "sequential"),
        "metrics": record["metrics"],
        "base_metrics": record.get("base_metrics"),
        "seconds": record["seconds"],
        "threads": record.get("threads"),  # None in records written before 12-05
        "checkpoint": record["checkpoint"],
        "output_hash": record["output_hash"],
        "targets": dict(record["targets"].get("counts", {})),
        "read_as": request_readings(record),
        "check": record.get("check"),
        **({"by_sentence": record["by_sentence"]} if "by_sentence" in record else {}),  # evaluate.templates
    }


if __name__ == "__main__":
    main()
