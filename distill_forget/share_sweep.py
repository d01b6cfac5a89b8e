"""How a step's forgetting and its quality rise grow with the share of its weight change kept.

    python -m distill_forget.share_sweep RUN NN-concept [--shares 0.25 0.5 0.75 1]

For one step of a sequential run (RUN/steps/NN-concept), the models `M_(i-1) + s (M_i - M_(i-1))`
for each share s (what `step.change_scale` keeps; 0 is the step's teacher, 1 the step as it was
saved), evaluated as the loop evaluates that step: the run's evaluation settings and judge, the
concepts forgotten and replayed so far, and retention and quality relative to the base model
over the same pairs. One evaluation per share, as long as the loop's (~2 min on 2 CPU cores
for the MiniCanvas grid). Whether a share chosen per request could hold the quality bar where
the whole change does not: the smallest share whose UA still meets the bar, and its rise.
"""

import argparse
from pathlib import Path

import torch

from distill_forget.bars_noise import run_config
from distill_forget.config import resolve_model_dir
from distill_forget.evaluate import evaluate_pipeline, load_judge
from distill_forget.ledger import Ledger, LedgerError, checkpoint_folder
from distill_forget.merging import merge_states, unet_state
from distill_forget.metrics import quality_rise, relative_to_base
from distill_forget.pipelines import load_pipeline, pick_device
from distill_forget.train import base_metrics_for, evaluation_for, load_base

COLUMNS = (  # (row key, title, width) of the printed table
    ("ua", "UA", 6), ("ira_rel", "IRA %", 6), ("cra_rel", "CRA %", 6), ("nra_rel", "NRA %", 6),
    ("quality", "quality", 8), ("quality_vs_base", "vs base %", 9), ("forget_rate", "step concept forgotten %", 24),
)  # fmt: skip


def step_models(run_dir: Path, records: list[dict], step: str) -> tuple[int, Path, Path]:
    """(index, teacher folder, student folder) of the step named `step` (NN-concept)."""
    for record in records:
        student = checkpoint_folder(run_dir, record)
        if student.parent.name == step:
            index = record["index"]
            teacher = checkpoint_folder(run_dir, records[index - 2]) if index > 1 else None
            return index, teacher, student
    names = ", ".join(checkpoint_folder(run_dir, r).parent.name for r in records)
    raise SystemExit(f"{run_dir} has no finished step {step!r} (it has: {names or 'none'})")


def sweep(run_dir: Path, step: str, shares: list[float]) -> list[dict]:
    """One row per share: UA, retention % of base, quality and its rise over base."""
    cfg = run_config(run_dir)
    if cfg.setting != "sequential":
        raise SystemExit(f"share_sweep needs a sequential run: {run_dir} ran setting={cfg.setting}")
    try:
        records = Ledger(run_dir / "ledger.jsonl").verify()
    except (LedgerError, FileNotFoundError) as err:
        raise SystemExit(f"cannot read the run's ledger: {err}") from None
    base = load_base(run_dir)
    if base is None:
        raise SystemExit(f"{run_dir} has no base evaluation (base/metrics.json and base/images.pt)")
    index, teacher_dir, student_dir = step_models(run_dir, records, step)
    teacher_dir = teacher_dir or resolve_model_dir(cfg.model)
    sets = evaluation_for(records[:index])
    judge = load_judge(cfg.judge)
    device = pick_device(cfg.evaluate.device)
    pipe = load_pipeline(student_dir, device)
    student = {k: v.clone() for k, v in pipe.unet.state_dict().items()}  # pipe.unet is overwritten below
    teacher = {k: v.to(device) for k, v in unet_state(teacher_dir).items()}  # its UNet alone, not a pipeline
    rows = []
    for share in shares:
        if share == 1:  # the step's own weights, bit for bit
            weights = student
        elif share == 0:
            weights = teacher
        else:
            weights = merge_states(teacher, [student], "task_arithmetic", share)
        pipe.unet.load_state_dict(weights)
        print(f"share {share}: evaluating ...", flush=True)
        result, _ = evaluate_pipeline(pipe, judge, cfg.evaluate, sets["forgotten"], None, sets["replayed"])
        metrics = result["metrics"]
        base_metrics, _ = base_metrics_for(run_dir, base, judge, cfg, sets, result["neighbors"])
        rows.append({
            "share": share, "ua": metrics["ua"], **relative_to_base(metrics, base_metrics),
            "quality": metrics["quality"], "quality_vs_base": quality_rise(metrics["quality"], base_metrics["quality"]),
            "forget_rate": result["per_concept"][sets["forgotten"][-1]]["rate"],  # the step's own concept
        })  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder of python -m distill_forget.train")
    parser.add_argument("step", help="the step's folder name under RUN/steps, e.g. 03-stripes")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args(argv)
    if any(not 0 <= s <= 1 for s in args.shares):
        raise SystemExit(f"--shares must lie in [0, 1] (got {args.shares})")
    torch.set_num_threads(run_config(args.run).threads)
    rows = sweep(args.run, args.step, args.shares)
    print(f"{'share':>5} " + " ".join(f"{title:>{width}}" for _, title, width in COLUMNS))
    for row in rows:
        cells = [f"{'-' if row.get(key) is None else round(row[key], 1):>{width}}" for key, _, width in COLUMNS]
        print(f"{row['share']:>5} " + " ".join(cells))


if __name__ == "__main__":
    main()
