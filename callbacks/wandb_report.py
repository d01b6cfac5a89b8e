"""Weights & Biases for a sequence of requests: one W&B run for the whole loop.

Per optimizer step (through Lightning's `WandbLogger`, passed to every request's Trainer):
every objective's `loss/<name>`, `loss/total`, the gradient norm before the clip (`grad_norm`) and the
learning rate (`lr-AdamW`, or `lr-SGD` with `step.optimizer=sgd`). Per request
(`WandbReport.request_done`, called by the loop on rank 0): the metrics as curves over requests
(`request/<metric>`, x-axis `request`; `request/quality_vs_base`: the quality figure's rise over the
base model's on the same pairs, in %, as in report.md) and as a table (`metrics_table`), the step folder's
forget-vs-retain image grid (`grid`), and the ledger as an artifact (`ledger-<run id>`).

The run's id is kept in `RUN_DIR/wandb_id`, so a killed or requeued job that resumes the run
folder continues the same W&B run. Settings: the `wandb:` section of `configs/train.yaml`.
"""

import os
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from distill_forget.metrics import quality_rise
from distill_forget.report import format_counts, request_readings
from distill_forget.storage import atomic_file

MODES = ("auto", "online", "offline", "disabled")
ID_FILE = "wandb_id"
TABLE_COLUMNS = ("request", "concept", "kind", "ua", "ira", "cra", "nra", "quality", "quality_vs_base", "seconds",
                 "read_as")  # what the judge reads in the images of the request's concept


def wandb_mode(setting: str) -> str:
    """`auto`: WANDB_MODE when set, else online with WANDB_API_KEY, else offline (never a surprise upload)."""
    if setting not in MODES:
        raise ValueError(f"wandb.mode must be one of {list(MODES)} (got {setting!r})")
    if setting != "auto":
        return setting
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, made on first use."""
    path = run_dir / ID_FILE
    if path.exists():
        return path.read_text().strip()
    new = uuid.uuid4().hex[:8]  # W&B ids: letters and digits
    with atomic_file(path) as tmp:
        tmp.write_text(new + "\n")
    return new


class WandbReport:
    def __init__(self, logger):
        self.logger = logger  # lightning's WandbLogger: the losses and learning rate per step
        self.rows: list[list] = []

    @classmethod
    def start(cls, cfg, run_dir: Path) -> "WandbReport | None":
        """The sequence's W&B run (resumed when the run folder has one); None with wandb.mode=disabled."""
        settings = cfg.wandb
        mode = wandb_mode(settings.mode)
        if mode == "disabled":
            return None
        from lightning.pytorch.loggers import WandbLogger

        save_dir = settings.dir or os.environ.get("WANDB_DIR") or str(run_dir)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(
            project=settings.project, entity=settings.entity, name=run_dir.name, id=run_id(run_dir), resume="allow",
            mode=mode, save_dir=save_dir, config=OmegaConf.to_container(cfg, resolve=True),
        )  # fmt: skip
        run = logger.experiment
        run.define_metric("request")
        for key in ("request/*", "grid", "metrics_table"):
            run.define_metric(key, step_metric="request")
        print(f"[wandb] run {run.id} ({mode}) in {save_dir}", flush=True)
        return cls(logger)

    def request_done(self, record: dict, folder: Path, ledger_path: Path, base_metrics: dict | None = None,
                     log: bool = True) -> None:
        """Add a finished request to the table; with `log` (not when it was done by an earlier job), log it.

        `base_metrics`: the base model's metrics over the step's pairs, for the quality rise.
        """
        import wandb

        metrics = {k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))}
        rise = quality_rise(metrics.get("quality"), (base_metrics or {}).get("quality"))
        if rise is not None:
            metrics["quality_vs_base"] = rise
        request = record["request"]
        row = {"request": record["index"], "concept": request["concept"], "kind": request["kind"],
               **metrics, "seconds": record["seconds"],
               "read_as": format_counts(request_readings(record))}  # fmt: skip
        self.rows.append([row.get(column) for column in TABLE_COLUMNS])
        if not log:
            return
        run = self.logger.experiment
        entry = {"request": record["index"], "request/seconds": record["seconds"]}
        entry.update({f"request/{k}": v for k, v in metrics.items()})
        for sentence, read in (record.get("by_sentence") or {}).items():  # evaluate.templates: a curve per sentence
            numbers = {k: v for k, v in read["metrics"].items() if isinstance(v, (int, float))}
            entry.update({f"request/{sentence}/{k}": v for k, v in numbers.items()})
        entry["metrics_table"] = wandb.Table(columns=list(TABLE_COLUMNS), data=[list(r) for r in self.rows])
        grid = folder / "grid.png"
        if grid.exists():
            caption = f"request {record['index']} ({request['concept']}): forget prompts first, then retain"
            entry["grid"] = wandb.Image(str(grid), caption=caption)
        run.log(entry)
        ledger = wandb.Artifact(f"ledger-{run.id}", type="ledger", description="hash-chained audit ledger")
        ledger.add_file(str(ledger_path))
        run.log_artifact(ledger)

    def finish(self) -> None:
        self.logger.experiment.finish()
