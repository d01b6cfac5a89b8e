"""One unlearning request: teacher pipeline folder -> student pipeline folder.

`run_step` reads top to bottom: load the teacher, choose neighbours, the replayed concepts and
the mapping targets (`plan_prompts`), build the Lightning module, fit it once, save the student
as a stock diffusers pipeline folder with the step's record beside it.
"""

import copy
import json
import resource
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from callbacks import PlainProgress, StepCheckpoint
from distill_forget.distill.module import CheckpointError, DistillForgetModule, training_seed
from distill_forget.distill.networks import Denoiser, PromptEncoder, prompt_encoder
from distill_forget.distill.prompts import (
    PromptGroups,
    bank_concepts,
    check_pair_templates,
    concept_prompt,
    in_context,
    neighbor_pool,
    other_kind,
    pair_prompts,
    paraphrases,
    replace_concept,
    replayable_concepts,
    retain_prompts,
)
from distill_forget.distill.targets import (
    ScoreDistances,
    ScoreProbe,
    between_ratios,
    choose_neighbors,
    choose_targets,
    close_ratio,
    main_target,
    neighbors_between,
)
from distill_forget.distributed import cluster_environment, current_ranks, node_count, processes_per_node
from distill_forget.merging import merge_states
from distill_forget.pipelines import load_pipeline, pick_device
from distill_forget.requests import (
    Request,
    RequestFileError,
    check_minicanvas,
    mentions,
    merge_overrides,
    merge_settings,
)
from distill_forget.storage import atomic_dir, write_json
from distill_forget.world import concepts

RECORD_FILE = "distill_step.json"  # the step's record, saved inside the student's folder
# Settings that write MiniCanvas's sentences, refused in another world: what each does, where that world's go instead
MINICANVAS_SENTENCE_SETTINGS = {
    "concept_templates": (
        "writes MiniCanvas's concepts in more sentences", "list the sentences in the request's prompts"
    ),
    "retain.extra_templates": (
        "writes MiniCanvas's retained (object, style) pairs in more sentences", "list the sentences in retain.prompts"
    ),
    "regularizers.key_value_anchor.templates": (
        "writes MiniCanvas's retained (object, style) pairs in more sentences", "list the sentences in retain.prompts"
    ),
    "held_out_paraphrases": (
        "holds MiniCanvas's paraphrases out of its prompts", "its request's prompts are what it trains in"
    ),
}


def as_request(item: Request | str, world: str) -> Request:
    """An earlier request, given whole or by its concept name."""
    if isinstance(item, Request):
        return item
    return Request(item, concepts.kind_of(item) if world == "minicanvas" else "other")


def plan_prompts(
    request: Request, forgotten: list[Request], cfg, distances: ScoreDistances, encoder: PromptEncoder, pending=()
):
    """The step's prompt groups, and a record of every choice made to build them.

    `pending`: the concepts later requests of the sequence will forget (`target.avoid_pending`).
    """
    gone = {request.concept, *(f.concept for f in forgotten)}
    # Neighbours of earlier requests stay replayed (`retain.earlier_neighbors`): they were the
    # first damaged then, and nothing else would hold them now.
    earlier_neighbors = (
        [n for f in forgotten for n in f.neighbors if n not in gone] if cfg.retain.earlier_neighbors else []
    )
    # With `retain.earlier_targets`, so do their targets: what a forgotten concept was mapped onto
    # moved with it, and a held-out target is otherwise replayed only if a later request chooses
    # it as a neighbour.
    earlier_targets = ([t for f in forgotten for t in f.targets if t and t not in gone]
                       if cfg.retain.earlier_targets else [])
    touched = {c for f in forgotten for c in (*f.neighbors, *f.targets)}  # by earlier requests
    if cfg.world == "minicanvas":
        pool = neighbor_pool(request.kind, gone)
        concept_text = concept_prompt(request.concept, request.kind)
    else:
        pool = {c: c for c in bank_concepts(cfg.neighbors.pool, request.kind) if c not in gone}
        concept_text = request.concept
    neighbors, neighbor_record = choose_neighbors(
        cfg.neighbors.mode, concept_text, pool, cfg.neighbors.top_k, request.neighbors, distances, encoder
    )
    neighbor_prompts = {}  # the protected neighbours' prompts, to see which lie between the concept and a target
    between = {}  # target candidates left out (`target.between_margin`): {candidate: the neighbours between}

    if cfg.world == "minicanvas":
        neighbor_prompts = {n: concept_prompt(n, concepts.kind_of(n)) for n in neighbors}
        replayable = replayable_concepts(cfg.retain.replay_fraction, cfg.seed)
        retained = [c for c in concepts.OBJECTS + concepts.STYLES if c not in gone]
        earlier_replayed = {*earlier_neighbors, *earlier_targets}
        retain_replayed = [c for c in retained if (c in replayable or c in earlier_replayed) and c not in neighbors]

        def context(kind: str) -> list[str]:
            # Forget and neighbour prompts pair a concept with replayed concepts only, so a
            # held-out concept appears in no training prompt at all.
            return [c for c in retain_replayed if concepts.kind_of(c) == other_kind(kind)]

        trained_paraphrases = paraphrases(cfg)
        concept_forms = [*trained_paraphrases, *check_pair_templates(cfg.concept_templates, "concept_templates")]

        def named(concept: str, kind: str) -> list[str]:  # the prompts naming a concept in its world contexts
            return in_context(concept, kind, context(kind), concept_forms)

        forget = request.prompts or named(request.concept, request.kind)
        extra = check_pair_templates(cfg.retain.extra_templates, "retain.extra_templates")
        retain_forms = [*trained_paraphrases, *extra]
        retain = retain_prompts(retain_replayed, retain_forms)
        fresh = set(retain_prompts([c for c in retain_replayed if c not in touched], retain_forms))  # untouched only
        retain_touched = [p not in fresh for p in retain]
        anchor_templates = check_pair_templates(cfg.regularizers.key_value_anchor.templates,
                                                "regularizers.key_value_anchor.templates")  # fmt: skip
        anchored = pair_prompts(retain_replayed, anchor_templates)
        # (concept, prompt): each named concept in its world contexts
        def rows_of(names: list[str]) -> list[tuple[str, str]]:
            return [(n, p) for n in names for p in named(n, concepts.kind_of(n))]

        earlier_prompts = {f.concept: f.prompts or named(f.concept, f.kind) for f in forgotten}
        # Unless `target.among_neighbors`, the protected neighbours are not offered as the
        # replacement; unless `target.reuse`, neither are the targets of earlier requests; with
        # `target.avoid_pending`, neither are the concepts later requests will forget.
        same_kind = [c for c in retained if concepts.kind_of(c) == request.kind]
        offered = [c for c in same_kind if cfg.target.among_neighbors or c not in neighbors]
        taken = set() if cfg.target.reuse else {t for f in forgotten for t in f.targets}
        if cfg.target.avoid_pending:
            taken |= set(pending)
        candidates = request.targets or [c for c in offered if c not in taken] or offered
        # `target.between_margin`: no candidate with a protected neighbour between it and the
        # concept (unless every candidate has one).
        if cfg.target.mode == "score" and not request.targets:
            between = neighbors_between(concept_text, {c: concept_prompt(c, request.kind) for c in candidates},
                                        neighbor_prompts, distances, cfg.target.between_margin)  # fmt: skip
            candidates = [c for c in candidates if c not in between] or candidates
        candidates = without_excluded(candidates, cfg.target.exclude, request)
    else:
        if not request.prompts:
            where = request.where or repr(request.concept)
            raise RequestFileError(f"{where}: field 'prompts' is required when world={cfg.world!r}")
        forget = list(request.prompts)
        retain = list(cfg.retain.prompts)
        retain += [replace_concept(p, f.concept, n) for f in forgotten for n in f.neighbors if n in earlier_neighbors
                   for p in (f.prompts or [f.concept])]  # fmt: skip
        retain += [replace_concept(p, f.concept, t) for f in forgotten for t in f.targets if t in earlier_targets
                   for p in (f.prompts or [f.concept])]  # fmt: skip
        def rows_of(names: list[str]) -> list[tuple[str, str]]:  # the forget prompts with each concept in place
            return [(n, replace_concept(p, request.concept, n)) for n in names for p in forget]

        earlier_prompts = {f.concept: f.prompts or [f.concept] for f in forgotten}
        candidates = without_excluded(request.targets or [""], cfg.target.exclude, request)
        retain_replayed, anchored = [], []
        retain_touched = [any(mentions(p, c) for c in touched) for p in retain]
        for setting, (does, instead) in MINICANVAS_SENTENCE_SETTINGS.items():
            if OmegaConf.select(cfg, setting):
                raise ValueError(f"{setting} {does}; world={cfg.world!r} has none ({instead})")

    if cfg.forget_objective == "esd":  # negative guidance maps to no other prompt: no target to choose
        targets, target_record = [""] * len(forget), {"mode": "none (esd)", "counts": {}}
    else:
        if cfg.target.mode == "fixed":
            candidates = [request.targets[0] if request.targets else cfg.target.fixed]
        targets, target_record = choose_targets(
            cfg.target.mode, forget, request.concept, candidates, cfg.seed, distances, cfg.target.scope
        )
        if between:
            target_record["between"] = between
    mapped = [replace_concept(p, request.concept, t) for p, t in zip(forget, targets)]
    target_record["per_prompt"] = [{"prompt": p, "target": t, "mapped": m} for p, t, m in zip(forget, targets, mapped)]
    counts = target_record["counts"]
    target = main_target(counts) or ""
    target_text = concept_prompt(target, request.kind) if cfg.world == "minicanvas" else target
    if neighbor_prompts and target:
        if cfg.target.mode == "score":
            # how far the protected neighbours lie between the concept and the target (`target.between_margin`)
            ratios = between_ratios(concept_text, target_text, neighbor_prompts, distances)
            target_record["between_ratio"] = round(min(ratios.values()), 4)
        # how much nearer than the target the closest protected neighbour lies (`neighbors.close_margin`)
        neighbor_record["close_ratio"] = round(close_ratio(concept_text, target_text, neighbor_prompts, distances), 4)
    # `target.protect`: the target and the concepts closest to it (score distance, as neighbours
    # are chosen) are replayed with the neighbours.
    protected = []
    if cfg.target.protect > 0 and target:
        nearby = {c: p for c, p in pool.items() if c not in neighbors and c != target}
        closest, ranking = choose_neighbors("score", target_text, nearby, cfg.target.protect - 1, [], distances)
        protected = [target, *closest]
        target_record["protected"] = {"chosen": protected, "distance": ranking.get("distance", {})}
    neighbor_rows = rows_of([*neighbors, *protected])
    if cfg.world == "minicanvas":
        replayed = [c for c in retained if c in retain_replayed or c in neighbors or c in protected]
        held_out = [c for c in retained if c not in replayed]
    else:
        replayed, held_out = list(dict.fromkeys([*neighbors, *protected])), []
    neighbor = [p for _, p in neighbor_rows]
    neighbor_touched = [n in touched for n, _ in neighbor_rows]
    # Each forget prompt with a neighbour in the concept's place: replayed at the forget rows' own
    # noisy latents, where the student learns the mapping (`neighbors.twins`).
    twins = [[v for n in neighbors if (v := replace_concept(p, request.concept, n)) != p] for p in forget]

    # An earlier request that was mapped onto this concept follows it to its new target
    # (`target.follow`): its forgotten replay copies the teacher's output for its prompts with
    # the new target in place of the earlier concept, instead of the teacher's output for the
    # prompts themselves, which still draws this concept.
    forgotten_rows = [(f.concept, p) for f in forgotten for p in earlier_prompts[f.concept]]
    forgotten_prompts, forgotten_mapped = [p for _, p in forgotten_rows], []
    followers = [f.concept for f in forgotten if request.concept in f.targets] if cfg.target.follow else []
    if followers and counts:
        target_record["followers"] = dict.fromkeys(followers, target)
        forgotten_mapped = [replace_concept(p, c, target) if c in followers else p for c, p in forgotten_rows]
    groups = PromptGroups(
        forget, mapped, retain, neighbor, forgotten_prompts, twins, forgotten_mapped, retain_touched, neighbor_touched,
        anchored,
    )
    record = {
        "targets": target_record,
        "neighbors": neighbor_record,
        "retain_replayed": retain_replayed,
        "replayed_concepts": replayed,  # every retained concept some training prompt names
        "held_out_concepts": held_out,  # retained and never replayed: for *_unseen metrics
        "forgotten_before": [f.concept for f in forgotten],
        "prompt_counts": {**{name: len(p) for name, p in groups.as_dict().items()}, "twins": sum(map(len, twins)),
                          "retain_touched": sum(retain_touched),
                          "neighbor_touched": sum(neighbor_touched)},
    }  # fmt: skip
    return groups, record


def without_excluded(candidates: list[str], excluded, request: Request) -> list[str]:
    """`candidates` less `target.exclude`; refused when none is left."""
    kept = [c for c in candidates if c not in set(excluded or ())]
    if not kept:
        raise ValueError(f"step.target.exclude {list(excluded)} leaves no target candidate for {request.concept!r} "
                         f"(candidates: {candidates})")
    return kept


def plan_together(requests: list[Request], cfg, distances: ScoreDistances, encoder: PromptEncoder):
    """The simultaneous setting: every concept of `requests` forgotten in one step.

    Each concept is planned as a request with all the others forgotten; their forget, mapped
    and neighbour prompts are pooled; nothing is replayed as "forgotten before".
    """
    plans = [plan_prompts(r, [o for o in requests if o is not r], cfg, distances, encoder) for r in requests]
    pooled = lambda name: [p for g, _ in plans for p in getattr(g, name)]  # noqa: E731
    last_groups, record = plans[-1]
    neighbors = dict(zip(pooled("neighbor"), pooled("neighbor_touched")))  # each prompt once
    groups = PromptGroups(pooled("forget"), pooled("mapped"), last_groups.retain, list(neighbors), [], pooled("twins"),
                          retain_touched=last_groups.retain_touched,
                          neighbor_touched=list(neighbors.values()), anchored=last_groups.anchored)  # fmt: skip
    replayed = sorted({c for _, r in plans for c in r["replayed_concepts"]})
    record = {
        **record,
        "replayed_concepts": replayed,
        "held_out_concepts": [c for c in record["held_out_concepts"] if c not in replayed],
        "forgotten_before": [],
        "forgotten_together": [{"concept": r.concept, "targets": p["targets"]["counts"],
                                "neighbors": p["neighbors"]["chosen"]}
                               for r, (_, p) in zip(requests, plans)],
        "prompt_counts": {name: len(p) for name, p in groups.as_dict().items()},
    }  # fmt: skip
    return groups, record


def request_settings(cfg: DictConfig, request: Request, forgotten: list[Request]) -> DictConfig:
    """The step settings of `request`: `target.chain_overrides` merged in when an earlier request
    was mapped onto its concept (the end of a chain of targets), then the request's own `overrides`.
    The chain's overrides are the request's own where its `overrides` set them."""
    own = merge_overrides(cfg, request)
    chain = own.target.chain_overrides
    if not (chain and any(request.concept in f.targets for f in forgotten)):
        return own
    return merge_overrides(merge_settings(cfg, OmegaConf.to_container(chain), "step.target.chain_overrides"), request)


# Settings that decide the plan itself: plan overrides are merged after planning, so they may not hold them.
PLANNING_SETTINGS = ("world", "seed", "forget_objective", "neighbors", "target", "score", "retain")
# Their keys that only weigh what every plan writes (each forget prompt's neighbour twins), so plan overrides may.
TRAINING_KEYS_OF_PLANNING_SETTINGS = {"neighbors": {"twins"}}

# Training settings for a request whose plan has a value under a margin, merged once the plan is made, in this
# order, the request's own overrides last: (the plan's record holding the value, its name, the margin's setting,
# the overrides' setting). The plan's record keeps the overrides applied, under the overrides' last name.
PLAN_RULES = (
    ("targets", "between_ratio", "target.between_overrides_margin", "target.between_overrides"),
    ("neighbors", "close_ratio", "neighbors.close_margin", "neighbors.close_overrides"),
)


def plan_overrides(cfg: DictConfig, setting: str) -> dict:
    """The overrides at `setting` (a PLAN_RULES name) as a dict ({} for null); refused when they name a setting
    that decides the plan (it would be ignored)."""
    overrides = OmegaConf.select(cfg, setting)
    overrides = OmegaConf.to_container(overrides) if overrides else {}
    planning = [
        key
        for key, value in overrides.items()
        if key in PLANNING_SETTINGS
        and not (isinstance(value, dict) and set(value) <= TRAINING_KEYS_OF_PLANNING_SETTINGS.get(key, set()))
    ]
    if planning:
        raise ValueError(
            f"step.{setting}: {planning} decide the plan, which is made before these settings apply; "
            f"only training settings may be overridden: not {', '.join(PLANNING_SETTINGS)} (of neighbors, twins may)"
        )
    return overrides


def with_plan_overrides(cfg: DictConfig) -> DictConfig:
    """`cfg` with every rule's overrides merged in: refused, before any work, when one names a setting that
    decides the plan or no step setting at all."""
    for _, _, _, setting in PLAN_RULES:
        cfg = merge_settings(cfg, plan_overrides(cfg, setting), f"step.{setting}")
    return cfg


def plan_settings(cfg: DictConfig, plan: dict, request: Request) -> DictConfig:
    """The step settings once the plan is made: each rule's overrides merged in where the plan's value is under
    its margin (> 0; `target.between_overrides` where a protected neighbour lies between the concept and the
    target, `neighbors.close_overrides` where one lies far nearer the concept than the target), and recorded in
    the plan; the request's own `overrides` still win."""
    trained, applied = cfg, False
    for record, value_name, margin_setting, setting in PLAN_RULES:
        value, margin = plan[record].get(value_name), OmegaConf.select(cfg, margin_setting)
        if not margin > 0 or value is None or value >= margin:
            continue
        overrides = plan_overrides(cfg, setting)
        trained, applied = merge_settings(trained, overrides, f"step.{setting}"), True
        plan[record][setting.rpartition(".")[2]] = overrides
        print(f"[step] {value_name} {value} under {margin_setting} {margin}: training with {overrides}", flush=True)
    return merge_overrides(trained, request) if applied else cfg


def build_module(
    teacher_dir, request: Request, cfg: DictConfig, forgotten_before=(), base_dir=None, forget_together=(), pending=()
) -> tuple[DistillForgetModule, dict]:
    """The Lightning module of one request, and the record of its planning.

    `base_dir`: the base model M_0, for regularisers referenced to it. `forget_together`:
    earlier requests forgotten in this same step with `request` (the simultaneous setting; the
    step then runs `steps` optimizer steps per concept). `pending`: concepts later requests of
    the sequence will forget, no target candidates with `target.avoid_pending`.
    """
    started = time.time()
    forgotten = [as_request(f, cfg.world) for f in (*forget_together, *forgotten_before)]
    cfg = request_settings(cfg, request, forgotten)
    if not cfg.change_scale > 0:
        raise ValueError(
            f"change_scale must be > 0 (got {cfg.change_scale}): the share of the trained change the step keeps"
        )
    if forget_together:
        cfg = OmegaConf.merge(cfg, {"steps": cfg.steps * (len(forget_together) + 1)})
    if cfg.world == "minicanvas":
        check_minicanvas([request, *forgotten])
    device = pick_device("cpu" if cfg.accelerator == "cpu" else "auto")
    pipe = load_pipeline(teacher_dir)
    student_unet = copy.deepcopy(pipe.unet)
    if cfg.gradient_checkpointing:
        student_unet.enable_gradient_checkpointing()
    # The teacher's planning and replay sampling run at the training's mixed precision (bf16 on GPU).
    autocast = AUTOCAST_DTYPES.get(training_precision(cfg, on_gpu=device.type == "cuda"))
    teacher = Denoiser(pipe.unet.requires_grad_(False).eval().to(device), autocast)
    encoder = prompt_encoder(pipe, device)  # one text encoder (SD v1/v2) or two (SDXL)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    probe = ScoreProbe(teacher.latent_shape, cfg.score.latents, cfg.seed, noise_scheduler, device)
    modes = f"neighbours by {cfg.neighbors.mode}, targets by {cfg.target.mode}"
    print(f"[step] {request.concept!r}: planning the prompts ({modes})", flush=True)
    distances = ScoreDistances(teacher, encoder, probe)
    if forget_together:
        groups, plan = plan_together([*forgotten[: len(forget_together)], request], cfg, distances, encoder)
    else:
        groups, plan = plan_prompts(request, forgotten, cfg, distances, encoder, pending)
    plan["teacher_evaluations_planning"] = teacher.evaluations
    plan["seconds_planning"] = round(time.time() - started, 2)
    print(
        f"[step] neighbours {plan['neighbors']['chosen']}; targets {plan['targets']['counts']}; "
        f"prompts {plan['prompt_counts']}",
        flush=True,
    )
    if not forget_together:  # the simultaneous setting pools several plans: no one target to judge
        cfg = plan_settings(cfg, plan, request)
    regs = cfg.regularizers
    wants_base = [regs.l1sp.reference, regs.l2sp.reference]
    if regs.key_value_anchor.weight:
        wants_base.append(regs.key_value_anchor.reference)
    if (cfg.lambda_r or cfg.lambda_n) and cfg.replay.retain_teacher != "previous":  # M_0 answers trained rows
        wants_base.append("base")
    base_unet = None
    if (
        base_dir is not None
        and "base" in wants_base
        and Path(base_dir).resolve() != Path(teacher_dir).resolve()  # else the teacher is the base
    ):
        base_unet = load_pipeline(base_dir).unet.requires_grad_(False).eval()
    return DistillForgetModule(student_unet, teacher, encoder, groups, cfg, pipe.scheduler.config, base_unet), plan


STRATEGIES = ("auto", "ddp", "fsdp")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning precision -> autocast dtype


def training_precision(cfg: DictConfig, on_gpu: bool) -> str:
    """Lightning's precision string: `precision`, else bf16-mixed on GPU and 32-true on CPU."""
    return cfg.precision or ("bf16-mixed" if on_gpu else "32-true")


def processes(cfg: DictConfig) -> tuple[int, int]:
    """(processes per node, nodes) from `devices` / `num_nodes`; `auto` takes the launcher's."""
    devices = processes_per_node() if cfg.devices == "auto" else int(cfg.devices)
    nodes = node_count() if cfg.num_nodes == "auto" else int(cfg.num_nodes)
    if devices * nodes > 1 and cluster_environment() is None:
        raise ValueError(
            f"devices={devices} x num_nodes={nodes} processes must be started by a launcher: "
            f"torchrun --nproc_per_node {devices} -m distill_forget.train ..., or srun (launch/). "
            "Lightning's own launcher would re-run the whole loop in every process"
        )
    return devices, nodes


def make_strategy(cfg: DictConfig, on_gpu: bool, world: int):
    """Lightning's strategy for `strategy` (auto | ddp | fsdp)."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)} (got {cfg.strategy!r})")
    backend = "nccl" if on_gpu else "gloo"
    if cfg.strategy == "ddp" or (cfg.strategy == "auto" and world > 1):
        # Only the student is wrapped: the frozen teacher is a plain attribute, outside the reducer.
        return DDPStrategy(process_group_backend=backend)
    if cfg.strategy == "fsdp":
        # One FSDP unit over the student: gradients and AdamW states are sharded (most of the
        # memory of a full SDXL UNet); the parameters are gathered whole for each step, since
        # the student is called several times per step and the parameter anchor reads them all.
        return FSDPStrategy(process_group_backend=backend, use_orig_params=True, state_dict_type="full")
    return "auto"


def make_trainer(cfg: DictConfig, name: str = "step", checkpoint_dir=None, logger=None) -> L.Trainer:
    """A Trainer for one request; with `checkpoint_dir`, it keeps `last.ckpt` there to resume from.

    `logger` (e.g. the sequence's WandbLogger) gets every loss and the learning rate per step.
    Under SLURM, Lightning's auto-requeue is on: on the requeue signal (`--signal=SIGUSR1@90`)
    it saves `hpc_ckpt_<n>.ckpt` into `checkpoint_dir` and requeues the job.
    """
    on_gpu = cfg.accelerator != "cpu" and torch.cuda.is_available()
    devices, nodes = processes(cfg)
    callbacks = [PlainProgress(name)]
    if checkpoint_dir is not None:
        callbacks.append(StepCheckpoint(checkpoint_dir, cfg.checkpoint_every))
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    plugins = [SLURMEnvironment(auto_requeue=True)] if isinstance(cluster_environment(), SLURMEnvironment) else None
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the batches come from the replay source
    return L.Trainer(
        max_steps=cfg.steps,
        accumulate_grad_batches=cfg.accumulate,
        accelerator="gpu" if on_gpu else "cpu",
        devices=devices,
        num_nodes=nodes,
        strategy=make_strategy(cfg, on_gpu, devices * nodes),
        plugins=plugins,
        use_distributed_sampler=False,  # every rank walks all micro-batch indices; GlobalBatch slices the samples
        precision=training_precision(cfg, on_gpu),
        gradient_clip_val=cfg.grad_clip,
        gradient_clip_algorithm="norm",
        logger=logger if logger is not None else False,
        default_root_dir=checkpoint_dir,
        enable_checkpointing=checkpoint_dir is not None,
        callbacks=callbacks,
        enable_model_summary=False,
        enable_progress_bar=False,  # PlainProgress: lines that read well in log files
        log_every_n_steps=1,
    )


def latest_checkpoint(checkpoint_dir) -> Path | None:
    """The newest of `last.ckpt` and the `hpc_ckpt_<n>.ckpt` Lightning saves on a SLURM requeue signal."""
    if checkpoint_dir is None:
        return None
    found = [p for p in Path(checkpoint_dir).glob("*.ckpt") if p.name == "last.ckpt" or p.name.startswith("hpc_ckpt_")]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def student_unet(trainer: L.Trainer, module: DistillForgetModule):
    """The trained student UNet, whole (on rank 0): under FSDP its parameters are gathered first."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return module.unet
    state = trainer.strategy.lightning_module_state_dict()  # collective: every rank calls it
    if not trainer.is_global_zero:
        return None
    unet = copy.deepcopy(module.teacher.unet)  # the architecture; every weight is then replaced
    unet.load_state_dict({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
    return unet


def step_indices(cfg: DictConfig) -> DataLoader:
    """The data: just the micro-batch indices; the replay source provides the latents."""
    return DataLoader(range(cfg.steps * cfg.accumulate), batch_size=None)


def peak_memory_mb() -> dict[str, float]:
    """Peak memory so far: the process's resident set (never reset) and, on GPU, CUDA allocations."""
    peak = {"process_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
    if torch.cuda.is_available():
        peak["gpu"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def scale_change(unet, teacher_unet, scale: float) -> None:
    """`unet` moved to `teacher + scale (unet - teacher)`, in place: task arithmetic of the one student."""
    if scale != 1.0:
        unet.load_state_dict(merge_states(teacher_unet.state_dict(), [unet.state_dict()], "task_arithmetic", scale))


def save_student(unet, teacher_dir: Path, out_dir: Path, record: dict) -> None:
    """A complete stock pipeline folder: the student UNet, every other component copied."""
    index = json.loads((teacher_dir / "model_index.json").read_text())
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    with atomic_dir(out_dir) as tmp:
        shutil.copy2(teacher_dir / "model_index.json", tmp / "model_index.json")
        for name in components:
            if name != "unet":
                shutil.copytree(teacher_dir / name, tmp / name)
        unet.save_pretrained(tmp / "unet")
        write_json(tmp / RECORD_FILE, record)


def run_step(
    teacher_dir,
    request: Request,
    cfg: DictConfig,
    out_dir,
    forgotten_before=(),
    checkpoint_dir=None,
    logger=None,
    base_dir=None,
    forget_together=(),
    pending=(),
) -> dict:
    """Forget `request.concept` from the teacher folder's model; the student goes to `out_dir`.

    `forgotten_before`: concepts (names or Requests) forgotten by earlier requests, replayed
    through the teacher so they stay forgotten. Returns the step's record (also saved as
    `out_dir/distill_step.json`). With `checkpoint_dir`, Lightning checkpoints are kept there
    and the newest one left by a killed or requeued run is resumed from. With several
    processes every rank calls this; rank 0 writes the student, the others wait for it.
    `base_dir`, `forget_together` and `pending`: see `build_module`.
    """
    started = time.time()
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if out_dir.resolve() == teacher_dir.resolve():
        raise ValueError(f"out_dir must differ from the teacher folder {teacher_dir}: the teacher is M_(i-1), kept")
    L.seed_everything(cfg.seed, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    module, plan = build_module(teacher_dir, request, cfg, forgotten_before, base_dir, forget_together, pending)
    cfg = module.cfg  # with the request's overrides
    if training_seed(cfg) != cfg.seed:  # the plan was drawn from `seed`; the training draws from its own
        L.seed_everything(training_seed(cfg), verbose=False)
    trainer = make_trainer(cfg, f"step {request.concept!r}", checkpoint_dir, logger)
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None and trainer.is_global_zero:
        print(f"[step] resuming {request.concept!r} from {resume}", flush=True)
    fit_started = time.time()
    try:
        trainer.fit(module, train_dataloaders=step_indices(cfg), ckpt_path=resume)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {resume} cannot be resumed: {err}") from None
    except (RuntimeError, EOFError, OSError) as err:
        if resume is None:
            raise
        raise CheckpointError(
            f"checkpoint {resume} cannot be resumed (corrupt?): {err}; delete it to redo the step"
        ) from err
    fit_seconds = time.time() - fit_started
    planning_seconds = plan.pop("seconds_planning")
    planning_evaluations = plan.pop("teacher_evaluations_planning")
    ranks = current_ranks()
    per_rank = ranks.gather([module.teacher_evaluations, module.sampler.evaluations, module.student.evaluations])
    teacher_evaluations, sampling_evaluations, student_evaluations = (
        [sum(c) for c in zip(*per_rank)] if per_rank else [0] * 3
    )
    record = {
        "request": request.to_dict(),
        # no path of the student's own: the record lies in its folder, which the check may rename
        "teacher": str(teacher_dir),
        **plan,
        "steps": trainer.global_step,
        "resumed_from": str(resume) if resume else None,
        "final_losses": module.last_losses,
        "evaluations": {  # samples through each network (a batch of 8 counts 8), summed over ranks
            "teacher": teacher_evaluations,
            "teacher_planning": planning_evaluations,  # every rank plans alike: one rank's count
            "teacher_sampling": sampling_evaluations,
            "student": student_evaluations,
        },
        "seconds": {
            "planning": planning_seconds,
            "replay_bank": round(module.replay_seconds, 2),
            "training": round(fit_seconds - module.replay_seconds, 2),
            "total": round(time.time() - started, 2),  # without the save, a second or two
        },
        "peak_memory_mb": peak_memory_mb(),
        "settings": OmegaConf.to_container(cfg, resolve=True),
    }
    unet = student_unet(trainer, module)
    if ranks.is_main:
        scale_change(unet, module.teacher.unet, cfg.change_scale)
        save_student(unet, teacher_dir, out_dir, record)
        seconds = record["seconds"]["total"]
        print(f"[step] {request.concept!r} forgotten in {seconds:.0f} s; student pipeline in {out_dir}", flush=True)
    ranks.barrier()  # the other ranks read the student folder only once it is whole
    return record
