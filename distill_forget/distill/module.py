"""The Lightning module of a step: the student UNet learns from the frozen teacher.

Only the student UNet is registered (trained, checkpointed, moved by Lightning). The teacher
and the text encoder sit in plain attributes (`Denoiser`, `PromptEncoder`), so they are in
neither the optimizer nor any checkpoint; the module moves them to its device itself.
"""

import math
import time

import lightning as L
import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf

from distill_forget.config import read_config
from distill_forget.distill.global_batch import GlobalBatch
from distill_forget.distill.networks import Blend, Condition, Denoiser, PromptEncoder, tokens_and_end
from distill_forget.distill.objectives import (
    ESD,
    ConceptAblation,
    ForgetMapping,
    ForgottenReplay,
    NeighborPreservation,
    ParameterAnchor,
    RetainReplay,
    Rows,
    StartingPointPenalty,
    TwinReplay,
    UnconditionalReplay,
    run_rows,
)
from distill_forget.distill.prompts import PromptGroups
from distill_forget.distill.regularizers import (
    KEY_VALUE,
    KeyValueAnchor,
    LowRankChange,
    ProtectedProjection,
    SelectiveMask,
    StartTokenHold,
)
from distill_forget.distill.replay import TeacherSampler, make_replay
from distill_forget.distributed import current_ranks
from distill_forget.requests import flat_items

TRAINABLE = {
    "full": lambda name: True,
    "cross_attention": lambda name: ".attn2." in name,
    "cross_attention_kv": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
    "non_cross_attention": lambda name: ".attn2." not in name,  # ESD-u
}

FORGET_OBJECTIVES = ("distill", "esd", "ablation")
# The rows that keep things unchanged which the base model M_0 answers, by `replay.retain_teacher`
# (the teacher answers the others, and always the forget and forgotten rows).
# `untouched`: the empty prompt and the retain and neighbour rows whose prompt names no concept an
# earlier request chose as a neighbour or target (`groups.retain_touched`, `groups.neighbor_touched`);
# the teacher answers the touched ones' rows.
BASE_ROWS = {
    "previous": (),
    "base": ("retain", "neighbor", "unconditional", "twin"),
    "untouched": ("retain_untouched", "neighbor_untouched", "unconditional"),
}
SPLIT_GROUPS = ("retain", "neighbor")  # the groups `untouched` splits by prompt
PROTECTABLE_GROUPS = ("retain", "neighbor", "forgotten")  # prompt groups the projection and key-value anchor protect
BASE_HOLDABLE_GROUPS = ("retain", "neighbor", "anchored")  # the key-value anchor's groups M_0 may hold (`held_at_base`)
GUIDED_LOSSES = ("forget", "retain", "neighbor", "forgotten", "twin")  # those `loss_guidance` may compare guided
# `loss_scale`: {name: (the forget mapping's scale, the retain / neighbour / forgotten replays' scale)}
LOSS_SCALE_CHOICES = {
    "mse": ("mse", "mse"),
    "relative": ("relative", "relative"),
    "relative_replays": ("mse", "relative"),
    "relative_forget": ("relative", "mse"),
}


def loss_scales(name: str) -> tuple[str, str]:
    """The forget mapping's and the replays' scales for the config's `loss_scale`."""
    if name not in LOSS_SCALE_CHOICES:
        raise ValueError(f"loss_scale must be one of {list(LOSS_SCALE_CHOICES)} (got {name!r})")
    return LOSS_SCALE_CHOICES[name]


def forget_objective(cfg, noise_scheduler, draw, scale: str):
    """The forget loss named by `forget_objective`: distill (ForgetMapping, at `scale`) | esd | ablation."""
    if cfg.forget_objective == "distill":
        return ForgetMapping(noise_scheduler, cfg.t_max, draw, scale, cfg.forget_overshoot, t_min=cfg.t_min)
    if cfg.forget_objective == "esd":
        return ESD(noise_scheduler, cfg.esd.eta, draw)
    if cfg.forget_objective == "ablation":
        return ConceptAblation(noise_scheduler, draw)
    raise ValueError(f"forget_objective must be one of {FORGET_OBJECTIVES} (got {cfg.forget_objective!r})")


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(cfg, params) -> torch.optim.Optimizer | None:
    """The step's optimizer, `optimizer`, with its own settings (`adamw`, `sgd`); with no parameters, only
    the name is checked (so a bad name fails before the replay bank is sampled)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)} (got {cfg.optimizer!r})")
    if params is None:
        return None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd.momentum, nesterov=cfg.sgd.nesterov)
    adamw = cfg.adamw
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(adamw.betas), weight_decay=adamw.weight_decay, eps=adamw.eps
    )


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup: int, steps: int, schedule: str) -> float:
    """The lr's share at optimizer step `step` (from 0): a linear warm-up over `warmup` steps, then
    `constant` 1, or `cosine` a half cosine from 1 down towards 0, which it would reach one step
    after the last of `steps`."""
    if step + 1 < warmup or schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    progress = min(1.0, (step + 1 - warmup) / (steps - warmup + 1))  # the last step's lr small, not 0
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightAverage:
    """An exponential moving average of the trained weights, updated after each optimizer step:
    avg <- decay avg + (1 - decay) w, from the request's starting weights. Its values, not the last
    step's, become the student (`weight_average`): where the last steps of a small batch happen to
    stop is averaged out. One copy of the trained parameters."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params, self.decay = params, decay
        self.values = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.values, self.params, 1.0 - self.decay)

    def to(self, device) -> None:
        self.values = [value.to(device) for value in self.values]

    def apply(self) -> None:
        """The averaged values into the trained parameters."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.values)


def select_trainable(unet: torch.nn.Module, mode: str) -> list[str]:
    """Leave only the parameter group `mode` trainable; returns the names of its parameters."""
    if mode not in TRAINABLE:
        raise ValueError(f"trainable must be one of {list(TRAINABLE)} (got {mode!r})")
    chosen = []
    for name, param in unet.named_parameters():
        param.requires_grad_(TRAINABLE[mode](name))
        if param.requires_grad:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"trainable={mode!r} selects no parameter of this UNet")
    return chosen


# Step settings a checkpoint may be resumed under when they changed: where and how it runs, not what it trains.
RESUMABLE_CHANGES = ("accelerator", "strategy", "devices", "num_nodes", "checkpoint_every", "gradient_checkpointing")


class CheckpointError(ValueError):
    """A request's Lightning checkpoint that cannot be resumed: unreadable, or trained under other settings."""


def settings_changes(before: dict, now: dict, defaults: dict | None = None) -> list[str]:
    """`key: before -> now` for every setting that differs between two nested dicts (keys dotted), but those
    of `RESUMABLE_CHANGES`. A setting `before` lacks (added to the code since) is no change where `now` holds
    its value in `defaults`: a new setting's default trains as the code did before it."""
    before, now, defaults = dict(flat_items(before)), dict(flat_items(now)), dict(flat_items(defaults or {}))
    pairs = {key: (before.get(key, "(unset)"), now.get(key, "(unset)")) for key in sorted(before.keys() | now.keys())}
    return [f"{key}: {old} -> {new}" for key, (old, new) in pairs.items()
            if old != new and key.split(".")[0] not in RESUMABLE_CHANGES
            and not (key not in before and key in defaults and new == defaults[key])]  # fmt: skip


def training_seed(cfg) -> int:
    """The seed of the training's own draws: `training_seed`, or `seed` where it is null."""
    return cfg.seed if cfg.training_seed is None else cfg.training_seed


def twin_table(twins: list[list[str]]) -> torch.Tensor:
    """(forget prompts, most twins of one): the flattened twin rows of each forget prompt, cycled to
    fill its row; -1 for a prompt without twins."""
    width = max(len(variants) for variants in twins)
    table, start = [], 0
    for variants in twins:
        rows = list(range(start, start + len(variants)))
        table.append([rows[j % len(rows)] for j in range(width)] if rows else [-1] * width)
        start += len(variants)
    return torch.tensor(table, dtype=torch.long)


def split_rows(rows: Rows, chosen: torch.Tensor) -> tuple[Rows, Rows]:
    """The rows where `chosen` holds, and the others."""
    take = lambda keep: Rows(rows.x_t[keep], rows.t[keep], rows.student[keep], [c[keep] for c in rows.teacher])  # noqa: E731
    return take(chosen), take(~chosen)


def with_empty(rows: Rows, empty: Condition) -> Rows:
    """The rows twice: as they are, then with the empty prompt in every condition at the same x_t
    and t, so that student and teacher outputs can be combined into guided predictions (`guided`)."""
    blank = empty[[0] * len(rows.t)]
    return Rows(torch.cat([rows.x_t, rows.x_t]), torch.cat([rows.t, rows.t]), Condition.cat([rows.student, blank]),
                [Condition.cat([condition, blank]) for condition in rows.teacher])  # fmt: skip


def guided(output: tuple, scale: float) -> tuple:
    """(student, [teacher]) classifier-free guided predictions `u + scale (c - u)`, row for row, from
    the outputs of rows built by `with_empty` (the conditional rows first, then the empty prompt's)."""

    def combine(paired: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = paired.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    student, teachers = output
    return combine(student), [combine(teacher) for teacher in teachers]


def empty_half(output: tuple) -> tuple:
    """The empty prompt's (student, [teacher]) outputs of rows built by `with_empty`."""
    student, teachers = output
    return student.chunk(2)[1], [teachers[0].chunk(2)[1]]


def joined(*outputs: tuple) -> tuple:
    """One loss's (student output, [teacher outputs]) from those of its split rows."""
    return torch.cat([o[0] for o in outputs]), [torch.cat(ts) for ts in zip(*(o[1] for o in outputs))]


class DistillForgetModule(L.LightningModule):
    def __init__(
        self,
        student_unet,
        teacher: Denoiser,
        encoder: PromptEncoder,
        groups: PromptGroups,
        cfg,
        scheduler_config,
        base_unet=None,  # M_0, for regularisers referenced to the base model (else the teacher is used)
    ):
        super().__init__()
        self.unet = student_unet
        self.trainable_names = select_trainable(self.unet, cfg.trainable)
        make_optimizer(cfg, None)  # its name checked now, not after the replay bank is sampled
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)} (got {cfg.lr_schedule!r})")
        if not 0.0 <= cfg.weight_average < 1.0:
            got = cfg.weight_average
            raise ValueError(f"weight_average must be in [0, 1): the average's decay per step, 0 off (got {got})")
        if cfg.weight_average and cfg.strategy == "fsdp":
            raise ValueError("weight_average averages whole parameters: not with strategy=fsdp, which shards them")
        if cfg.update_rank < 0:
            raise ValueError(f"update_rank must be >= 0: the rank kept, 0 off (got {cfg.update_rank})")
        if cfg.update_rank and cfg.strategy == "fsdp":
            raise ValueError("update_rank decomposes whole matrices: not with strategy=fsdp, which shards them")
        trained = [p for p in self.unet.parameters() if p.requires_grad]  # still the teacher's weights
        self.weight_average = WeightAverage(trained, cfg.weight_average) if cfg.weight_average else None
        self.student = Denoiser(self.unet)
        self.teacher = teacher
        self.teacher.unet.requires_grad_(False).eval()
        self.encoder = encoder
        self.groups, self.cfg, self.scheduler_config = groups, cfg, scheduler_config
        noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        # Which latents, noise and timesteps each micro-batch gets: drawn for the global batch
        # (`batch`) alike on every rank, each rank keeping its slice (its rank is set at fit start).
        self.draw = GlobalBatch(training_seed(cfg) + 1)  # + 1: a stream apart from the replay bank's
        # The losses hold no weights of their own; a zero lambda skips a loss and its network calls.
        mean_weight = cfg.replay.mean_weight  # every replay's extra weight on its error's spatial mean
        forget_scale, replay_scale = loss_scales(cfg.loss_scale)
        self.objectives = torch.nn.ModuleDict(
            {
                "forget": forget_objective(cfg, noise_scheduler, self.draw, forget_scale),
                "retain": RetainReplay(noise_scheduler, self.draw, replay_scale, mean_weight),
                "neighbor": NeighborPreservation(noise_scheduler, self.draw, replay_scale, mean_weight),
                "forgotten": ForgottenReplay(noise_scheduler, self.draw, replay_scale, mean_weight),
                "unconditional": UnconditionalReplay(noise_scheduler, self.draw, mean_weight),
                "twin": TwinReplay(noise_scheduler, self.draw, mean_weight),
                "reg": ParameterAnchor(),
                "l1sp": StartingPointPenalty(1),
                "l2sp": StartingPointPenalty(2),
            }
        )
        regs = cfg.regularizers
        # Plain attributes, like the teacher: references are never trained nor checkpointed.
        self.references = {"previous": teacher.unet, "base": base_unet if base_unet is not None else teacher.unet}
        for name in ("l1sp", "l2sp", "key_value_anchor"):
            if regs[name].reference not in self.references:
                raise ValueError(
                    f"regularizers.{name}.reference must be 'previous' or 'base' (got {regs[name].reference!r})"
                )
        if regs.key_value_anchor.forgotten_weight <= 0:
            raise ValueError(
                f"regularizers.key_value_anchor.forgotten_weight must be > 0 "
                f"(got {regs.key_value_anchor.forgotten_weight}; to hold none of them, leave forgotten out of protect)"
            )
        if cfg.update_rank and regs.selective.fraction:
            raise ValueError("update_rank and regularizers.selective cannot both be on: a low-rank change is not "
                             "sparse")
        if regs.key_value_anchor.tokens not in ("all", "padding"):
            raise ValueError(
                f"regularizers.key_value_anchor.tokens must be all or padding (got {regs.key_value_anchor.tokens!r})"
            )
        unknown = [g for g in regs.key_value_anchor.held_at_base if g not in BASE_HOLDABLE_GROUPS]
        if unknown:
            raise ValueError(
                f"regularizers.key_value_anchor.held_at_base names {unknown}: M_0 can hold only "
                f"{list(BASE_HOLDABLE_GROUPS)} (it draws the concepts forgotten since; the teacher holds those)"
            )
        if cfg.replay.retain_teacher not in BASE_ROWS:
            got = cfg.replay.retain_teacher
            raise ValueError(f"replay.retain_teacher must be one of {sorted(BASE_ROWS)} (got {got!r})")
        # Who answers the rows that keep things unchanged (retain, neighbour, empty prompt, twins):
        # the teacher, or for `BASE_ROWS` the base model M_0; the forget and forgotten rows always
        # read the teacher, which holds the earlier removals. Fixed for the request: {row: network}.
        base_rows = BASE_ROWS[cfg.replay.retain_teacher]
        share = cfg.replay.base_share
        if not 0.0 < share <= 1.0:
            raise ValueError(f"replay.base_share must be in (0, 1] (got {share})")
        if share < 1.0 and not base_rows:
            need = "set replay.retain_teacher to base or untouched"
            raise ValueError(f"replay.base_share applies where M_0 answers: {need}")
        self.retain_teacher = teacher
        if base_rows and self.references["base"] is not teacher.unet:
            self.retain_teacher = Denoiser(self.references["base"].requires_grad_(False).eval(), teacher.autocast)
            if share < 1.0:  # part-way: the teacher's answer moved `share` of the way to M_0's
                self.retain_teacher = Blend(teacher, self.retain_teacher, share)
        self.taught_by = dict.fromkeys(base_rows, self.retain_teacher)
        self.touched = {}  # `untouched`: {group: which of its prompts the teacher answers}
        for group in SPLIT_GROUPS:
            flags = getattr(groups, f"{group}_touched")
            if f"{group}_untouched" in base_rows and flags:
                self.touched[group] = torch.tensor(flags, dtype=torch.bool)
        self.selective: SelectiveMask | None = None
        self.projection: ProtectedProjection | None = None
        self.key_value_anchor: KeyValueAnchor | None = None
        self.start_token_hold: StartTokenHold | None = None
        self.low_rank: LowRankChange | None = None
        self.weights = {
            "forget": cfg.lambda_f,
            "retain": cfg.lambda_r,
            "neighbor": cfg.lambda_n,
            "forgotten": cfg.lambda_forgotten,
            # the empty prompt is retained with the retain prompts' weight (`retain.unconditional`)
            "unconditional": cfg.lambda_r if cfg.retain.unconditional else 0.0,
            # the forget prompts' neighbour twins are neighbours, weighed as such (`neighbors.twins`)
            "twin": cfg.lambda_n if cfg.neighbors.twins else 0.0,
            "reg": cfg.lambda_reg,
            "l1sp": regs.l1sp.weight,
            "l2sp": regs.l2sp.weight,
            "key_value_anchor": regs.key_value_anchor.weight,
        }
        guidance = cfg.loss_guidance
        self.guided_losses = set(guidance.losses) if guidance.scale != 1.0 else set()  # the losses compared guided
        if self.guided_losses - set(GUIDED_LOSSES):
            raise ValueError(f"loss_guidance.losses must be among {GUIDED_LOSSES} (got {list(guidance.losses)})")
        if self.guided_losses and (cfg.loss_scale != "mse" or cfg.replay.retain_teacher == "untouched"):
            # relative scales divide by the conditional predictions' own differences; `untouched` has the
            # empty prompt answered by M_0, but the touched rows' by the teacher
            raise ValueError(
                f"loss_guidance.scale={guidance.scale} compares guided predictions, which needs loss_scale=mse and a "
                "retain_teacher other than untouched"
            )
        for name, used in (("projection", regs.projection.enabled), ("key_value_anchor", regs.key_value_anchor.weight)):
            groups = list(regs[name].protect)
            if used and (not groups or set(groups) - set(PROTECTABLE_GROUPS)):
                raise ValueError(
                    f"regularizers.{name}.protect must list groups among {PROTECTABLE_GROUPS} (got {groups})"
                )
            if used and not any(n.endswith(KEY_VALUE) for n in self.trainable_names):
                raise ValueError(
                    f"regularizers.{name} holds keys and values, but trainable={cfg.trainable!r}"
                    " trains no attn2.to_k / to_v weight"
                )
        self.embeds: dict[str, Condition] = {}
        self.twin_table: torch.Tensor | None = None  # (forget prompts, k): rows of embeds["twin"], -1: none
        self.sampler, self.replay, self.replay_seconds = None, None, 0.0
        self.local_rows: dict[str, int] = {}  # this rank's rows per replay group, set at fit start
        self.last_losses: dict[str, float] = {}

    def setup(self, stage: str = "fit") -> None:
        # Every prompt of the step is encoded once here, never per batch.
        if not self.embeds:
            groups = {name: prompts for name, prompts in self.groups.as_dict().items() if prompts}
            groups["unconditional"] = [""]  # the empty prompt, one row: guided sampling, relative replays, ESD
            self.embeds = {name: self.encoder(prompts).to("cpu") for name, prompts in groups.items()}
            if self.objectives["forget"].reference == "empty":  # ESD's unconditional branch, row for row
                self.embeds["empty"] = self.embeds["unconditional"][[0] * len(self.embeds["forget"])]
            twins = [t for variants in self.groups.twins for t in variants]
            if self.weights["twin"] and self.weights["forget"] and twins:
                self.embeds["twin"] = self.encoder(twins).to("cpu")
                self.twin_table = twin_table(self.groups.twins)

    def on_fit_start(self) -> None:
        self.teacher.unet.to(self.device)
        self.references["base"].to(self.device)
        self.embeds = {name: e.to(self.device) for name, e in self.embeds.items()}
        if self.twin_table is not None:
            self.twin_table = self.twin_table.to(self.device)
        # on the device once per request: the replay's prompt indices are drawn there every micro-batch
        self.touched = {group: flags.to(self.device) for group, flags in self.touched.items()}
        cfg = self.cfg
        batch = cfg.replay.sampling_batch
        guidance = cfg.replay.guidance
        empty = self.embeds["unconditional"] if guidance != 1.0 else None
        self.sampler = TeacherSampler(self.teacher, self.scheduler_config, cfg.sampling_steps, batch, guidance, empty)
        # Teacher latents only for the groups a weighted loss reads (naive methods sample no replay).
        needed = {g for g in ("retain", "neighbor", "forgotten") if self.weights[g]}
        if self.weights["forget"]:
            needed.add(self.objectives["forget"].latents)
        sampled = {name: e for name, e in self.embeds.items() if name in needed}
        ranks = current_ranks()  # the process group Lightning runs in (one process without one)
        self.draw.rank, self.draw.world = ranks.rank, ranks.world
        self.draw.local_size(cfg.batch)  # a clear error now for a batch that does not split over the ranks
        # This rank's rows per replay group, once per request (and a clear error for rows that do not split).
        self.local_rows = {
            g: self.draw.local_size(n, f"step.batch's {g} replay rows") for g, n in self.replay_rows().items()
        }
        self.replay = make_replay(cfg.replay, self.sampler, sampled, training_seed(cfg), self.draw)
        started = time.time()
        if cfg.replay.mode == "bank" and ranks.is_main:
            print(
                f"[step] sampling the replay bank: {cfg.replay.bank_size} teacher latents x {len(sampled)} groups "
                f"({', '.join(sampled)}), {cfg.sampling_steps} DDIM steps",
                flush=True,
            )
        self.replay.prepare()
        self.replay_seconds = time.time() - started
        self.prepare_regularizers()
        if self.weight_average is not None:  # after on_load_checkpoint, which may have replaced its values
            self.weight_average.to(self.device)

    def prepare_regularizers(self) -> None:
        """Once per request: the selective-fine-tuning mask and the protected-embedding projection."""
        regs = self.cfg.regularizers
        if regs.selective.fraction and not self.weights["forget"]:
            raise ValueError(
                "regularizers.selective ranks elements by the forget loss's gradient: it needs lambda_f > 0"
            )
        if regs.selective.fraction and self.selective is None:  # None: not restored from a checkpoint
            self.unet.zero_grad(set_to_none=True)
            for _ in range(regs.selective.batches):  # gradient of the forget loss, accumulated
                self.forget_loss().backward()
            self.selective = SelectiveMask.from_gradients(self.unet, regs.selective.fraction)
            self.unet.zero_grad(set_to_none=True)
            kept = sum(int(m.sum()) for m in self.selective.masks.values())
            print(f"[step] selective fine-tuning: {kept} of the trainable elements may change", flush=True)
        if self.cfg.hold_start_token:
            start = self.text_states("unconditional")[0, 0]
            self.start_token_hold = StartTokenHold(self.unet, self.teacher.unet, start)
        if self.cfg.update_rank:
            self.low_rank = LowRankChange(self.unet, self.teacher.unet, self.cfg.update_rank)
            print(f"[step] the change of {len(self.low_rank.held)} trained matrices is kept to rank "
                  f"{self.cfg.update_rank}", flush=True)  # fmt: skip
        if regs.projection.enabled:
            states = torch.cat([self.text_states(g) for g in self.protected_groups("projection")])
            self.projection = ProtectedProjection(self.unet, states, regs.projection.dedup_cosine)
            print(f"[step] gradient projection on {len(self.projection.names)} key/value weights, "
                  f"{self.projection.columns} protected token embeddings", flush=True)  # fmt: skip
        if regs.key_value_anchor.weight:
            parts = self.anchor_parts()
            self.key_value_anchor = KeyValueAnchor(self.unet, parts)
            counts = ", ".join(
                f"{s.shape[:-1].numel()} at {'M_0' if ref is not self.teacher.unet else 'the teacher'}"
                + (f" x {w:g}" if w != 1.0 else "")
                for ref, s, w in parts
            )
            print(f"[step] key-value anchor on {len(self.key_value_anchor.terms)} keys and value paths, "
                  f"protected token states: {counts}", flush=True)  # fmt: skip

    def anchor_parts(self) -> list[tuple[torch.nn.Module, torch.Tensor, float]]:
        """The key-value anchor's (reference, token states, weight) parts. With `reference: previous` the teacher
        holds every protected group; with `base` the base model M_0 holds the groups in `held_at_base` (by default
        the retained and neighbouring concepts'), so the small drifts of successive steps do not add up, and the
        teacher the others: always the concepts forgotten before (M_0 draws them), whose states count
        `forgotten_weight` times each. The retained pairs in `templates` are held with the retained prompts."""
        anchor = self.cfg.regularizers.key_value_anchor
        groups = self.protected_groups("key_value_anchor")
        if "retain" in groups and "anchored" in self.embeds:
            groups.append("anchored")
        at_base = anchor.reference == "base" and self.references["base"] is not self.teacher.unet
        base_groups = [g for g in groups if g in anchor.held_at_base] if at_base else []
        held = [
            (self.references["base"], base_groups, 1.0),
            (self.teacher.unet, [g for g in groups if g not in base_groups and g != "forgotten"], 1.0),
            (self.teacher.unet, [g for g in groups if g == "forgotten"], anchor.forgotten_weight),
        ]
        return [(ref, self.anchored_states(names, anchor.tokens), w) for ref, names, w in held if names]

    def anchored_states(self, groups: list[str], tokens: str) -> torch.Tensor:
        """The groups' token states the key-value anchor holds: every token's, or (`tokens: padding`) only those
        after each prompt's end token, which the causal text encoder makes from the whole sentence."""
        states = torch.cat([self.text_states(g) for g in groups])
        if tokens == "all":
            return states
        tokenizer = getattr(self.encoder, "tokenizer", None) or self.encoder.tokenizers[0]
        prompts = [p for g in groups for p in self.groups.as_dict()[g]]
        ids, end = tokens_and_end(tokenizer, prompts)
        return states[(torch.arange(ids.shape[1]) > end).to(states.device)]

    def protected_groups(self, regularizer: str) -> list[str]:
        """The prompt groups `regularizers.<regularizer>.protect` names that the step has (by default: retained
        and neighbouring concepts, and those forgotten before), for a regulariser that holds their keys and
        values; a clear error where it has none."""
        groups = list(self.cfg.regularizers[regularizer].protect)
        present = [g for g in groups if g in self.embeds]
        if not present:
            raise ValueError(f"regularizers.{regularizer}: the step has no {' / '.join(groups)} prompts to protect")
        return present

    def text_states(self, group: str) -> torch.Tensor:
        """A prompt group's token states, what attn2.to_k / to_v read (SDXL's conditions carry more)."""
        return getattr(self.embeds[group], "text", self.embeds[group])

    def forget_rows(self) -> tuple[torch.Tensor, Rows]:
        """The forget objective's rows for one micro-batch (z0 from its replay group, prompts row
        for row), and the forget prompt of each row."""
        objective = self.objectives["forget"]
        index, z0 = self.replay.batch(objective.latents, self.draw.local_size(self.cfg.batch))
        return index, objective.rows(z0, self.embeds["forget"][index], self.embeds[objective.reference][index])

    def twin_rows(self, index: torch.Tensor, forget: Rows) -> Rows | None:
        """One neighbour twin of each forget row's prompt (drawn), at the forget row's x_t and t."""
        twin = self.twin_table[index, self.draw.randint(self.twin_table.shape[1], len(index), index.device)]
        keep = twin >= 0
        if not keep.any():
            return None
        rows = Rows(forget.x_t[keep], forget.t[keep], forget.student, forget.teacher)
        return self.objectives["twin"].on_rows(rows, self.embeds["twin"][twin[keep]])

    def forget_loss(self) -> torch.Tensor:
        """The forget objective alone on one micro-batch."""
        return self.objectives["forget"].loss(*self.network_outputs({"forget": self.forget_rows()[1]})["forget"])

    def network_outputs(self, rows: dict[str, Rows], empty_at: str | None = None) -> dict[str, tuple]:
        """{loss: (student output, [teacher outputs])} for every loss's rows, through one student call and
        one call per frozen network (`run_rows`).

        At `loss_guidance.scale` w != 1 the rows of the losses in `loss_guidance.losses` are read
        with the empty prompt too, at the same latents, and their outputs are the classifier-free
        guided predictions `u + w (c - u)`: a difference in `c - u`, which a guided sampler
        multiplies, then counts w^2 times. Where `empty_at` names such rows, their empty-prompt
        half is also the `unconditional` loss's output.
        """
        compared, empty = self.guided_losses, self.embeds["unconditional"]
        rows = {name: with_empty(r, empty) if name in compared else r for name, r in rows.items() if len(r.t)}
        outputs = run_rows(self.student, self.teacher, rows, self.taught_by) if rows else {}
        if empty_at in compared and empty_at in outputs:
            outputs["unconditional"] = empty_half(outputs[empty_at])
        scale = self.cfg.loss_guidance.scale
        return {name: guided(output, scale) if name in compared else output for name, output in outputs.items()}

    def replay_rows(self) -> dict[str, int]:
        """Rows of the global micro-batch per weighted replay group.

        `batch` each, except that once earlier requests have forgotten concepts, their replay
        takes `replay.forgotten_share` of the retain rows instead of rows of its own: every
        request of a sequence then trains on as many rows per step, so costs the same.
        """
        batch = self.cfg.batch
        active = [g for g in ("retain", "neighbor", "forgotten") if self.weights[g] and g in self.embeds]
        rows = dict.fromkeys(active, batch)
        if "retain" in rows and "forgotten" in rows:
            rows["forgotten"] = round(batch * self.cfg.replay.forgotten_share)
            rows["retain"] = batch - rows["forgotten"]
            if not 0 < rows["forgotten"] < batch:
                raise ValueError(
                    f"replay.forgotten_share={self.cfg.replay.forgotten_share} of batch={batch} must leave "
                    "at least one row to the retain replay and give at least one to the forgotten replay"
                )
        return rows

    def losses(self) -> dict[str, torch.Tensor]:
        """Each weighted objective on this rank's share of one micro-batch from the replay source.

        The distillation losses' rows go through one student call and one teacher call together.
        """
        rows = {}
        if self.weights["forget"]:
            index, rows["forget"] = self.forget_rows()
            if self.twin_table is not None and (twins := self.twin_rows(index, rows["forget"])) is not None:
                rows["twin"] = twins
        drawn = {}  # the prompt index of each replay group's rows
        for group, size in self.local_rows.items():
            index, z0 = self.replay.batch(group, size)
            drawn[group] = index
            teacher = self.embeds.get(f"{group}_mapped")  # forgotten prompts that follow a new target
            rows[group] = self.objectives[group].rows(z0, self.embeds[group][index], self.embeds["unconditional"],
                                                      None if teacher is None else teacher[index])  # fmt: skip
        # The empty prompt is replayed at the carrier's latents: rows of its own, or under loss_guidance
        # the empty-prompt half that every row gets anyway (`network_outputs`).
        carrier = next((g for g in ("retain", "neighbor") if g in rows), None)
        empty_at = carrier if self.weights["unconditional"] else None
        if empty_at is not None and empty_at not in self.guided_losses:
            empty = self.embeds["unconditional"][[0] * len(rows[carrier].x_t)]
            rows["unconditional"] = self.objectives["unconditional"].on_rows(rows[carrier], empty)
        for group, touched in self.touched.items():
            if group in rows:
                rows[group], rows[f"{group}_untouched"] = split_rows(rows[group], touched[drawn[group]])
        outputs = self.network_outputs(rows, empty_at)
        for group in self.touched:
            if f"{group}_untouched" in rows:  # one loss over both halves
                outputs[group] = joined(*(outputs.pop(n) for n in (group, f"{group}_untouched") if n in outputs))
        losses = {name: self.objectives[name].loss(*output) for name, output in outputs.items()}
        if self.weights["reg"]:
            losses["reg"] = self.objectives["reg"](self.unet, self.teacher.unet)
        for name in ("l1sp", "l2sp"):
            if self.weights[name]:
                reference = self.references[self.cfg.regularizers[name].reference]
                losses[name] = self.objectives[name](self.unet, reference)
        if self.key_value_anchor is not None:
            losses["key_value_anchor"] = self.key_value_anchor()
        return losses

    @property
    def teacher_evaluations(self) -> int:
        """Samples through the frozen networks: the teacher, and the base model if it answers the retain rows."""
        base = self.retain_teacher.evaluations if self.retain_teacher is not self.teacher else 0
        return self.teacher.evaluations + base

    def on_before_optimizer_step(self, optimizer) -> None:
        # Before Lightning clips the gradient norm, so the clip sees the gradient actually used.
        if self.selective is not None:
            self.selective.mask_gradients(self.unet)
        if self.projection is not None:
            self.projection.project_gradients(self.unet)
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        if grads:  # before the clip (grad_clip): how much it cuts, and with sgd how long the steps are
            self.log("grad_norm", torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # After the optimizer step (before any callback, so a checkpoint holds all of it): what may not
        # change is put back exactly (AdamW's per-element scaling and weight decay move it otherwise).
        # Mask first: the projection's guarantee wins. Then the average takes in the step as kept.
        if self.selective is not None:
            self.selective.hold(self.unet, self.teacher.unet)
        if self.projection is not None:
            self.projection.project_update(self.unet, self.teacher.unet)
        if self.start_token_hold is not None:
            self.start_token_hold.hold()
        if self.low_rank is not None:
            self.low_rank.hold()
        if self.weight_average is not None:
            self.weight_average.update()

    def on_train_end(self) -> None:
        if self.weight_average is not None:
            self.weight_average.apply()  # the student is the trained weights' average (`weight_average`)

    def training_step(self, batch, batch_idx):
        losses = self.losses()
        total = sum(self.weights[name] * loss for name, loss in losses.items())
        for name, loss in losses.items():
            self.log(f"loss/{name}", loss, prog_bar=name != "reg")
        self.log("loss/total", total)
        self.last_losses = {name: float(loss.detach()) for name, loss in {**losses, "total": total}.items()}
        return total

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["global_batch"] = self.draw.state_dict()  # a resumed run draws the batches it would have
        if self.selective is not None:  # computed on the request's starting weights: kept, not recomputed
            checkpoint["selective_masks"] = self.selective.masks
        checkpoint["step_settings"] = OmegaConf.to_container(self.cfg, resolve=True)  # the request's, as merged
        if self.weight_average is not None:
            checkpoint["weight_average"] = self.weight_average.values

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A request goes on only under the settings it was trained with so far: a rerun with other settings
        # would finish it as a mix of two. (Checkpoints written before 12-05 carry none and are resumed.)
        trained_under = checkpoint.get("step_settings")
        if trained_under is not None:
            now = OmegaConf.to_container(self.cfg, resolve=True)
            if changed := settings_changes(trained_under, now, OmegaConf.to_container(read_config("step"))):
                raise CheckpointError(
                    f"it was trained under other step settings ({'; '.join(changed)}): rerun with those to resume "
                    "it, or delete the checkpoint to train the request again under these"
                )
        if "global_batch" in checkpoint:
            self.draw.load_state_dict(checkpoint["global_batch"])
        if "selective_masks" in checkpoint:
            self.selective = SelectiveMask(checkpoint["selective_masks"])
        if self.weight_average is not None and "weight_average" in checkpoint:
            self.weight_average.values = checkpoint["weight_average"]

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.cfg, params)
        warmup, steps, name = max(1, self.cfg.warmup), self.cfg.steps, self.cfg.lr_schedule
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, steps, name))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
