"""The distillation step: request files, objectives, score distance, parameter groups, run_step."""

import copy
import dataclasses
import itertools
import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from distill_forget.config import load_config
from distill_forget.distill.global_batch import GlobalBatch
from distill_forget.distill.module import TRAINABLE, CheckpointError, lr_factor, make_optimizer, settings_changes
from distill_forget.distill.networks import Denoiser, PromptEncoder
from distill_forget.distill.objectives import (
    ForgetMapping,
    ForgottenReplay,
    NeighborPreservation,
    ParameterAnchor,
    RetainReplay,
    UnconditionalReplay,
    noised,
)
from distill_forget.distill.prompts import replace_concept
from distill_forget.distill.regularizers import KeyValueAnchor
from distill_forget.distill.replay import TeacherSampler
from distill_forget.distill.step import (
    RECORD_FILE,
    build_module,
    make_trainer,
    plan_prompts,
    plan_settings,
    request_settings,
    run_step,
    step_indices,
)
from distill_forget.distill.targets import ScoreDistances, ScoreProbe, choose_targets, score_distance
from distill_forget.pipelines import load_pipeline
from distill_forget.requests import Request, RequestFileError, check_minicanvas, load_requests, merge_overrides
from distill_forget.world import concepts
from distill_forget.world.model import training_scheduler

# Every knob at its cheapest: a few steps, a tiny bank, 2-step teacher sampling.
FAST = [
    "steps=3",
    "batch=2",
    "replay.bank_size=2",
    "sampling_steps=2",
    "score.latents=2",
    "target.mode=fixed",
    "neighbors.mode=request",
    "accelerator=cpu",
]


def fast_cfg(*extra):
    return load_config("step", FAST + list(extra))


# ---------------------------------------------------------------- request files


def write(tmp_path, text):
    path = tmp_path / "requests.yaml"
    path.write_text(text)
    return path


def test_valid_request_file_is_parsed(tmp_path):
    path = write(
        tmp_path,
        """
requests:
  - concept: dots
    kind: style
    target: stripes
    neighbors: [big dots]
    overrides: {steps: 7, replay: {mode: per_step}}
  - {concept: circle, kind: object, prompts: ["a circle in neon style"]}
""",
    )
    first, second = load_requests(path, settings=load_config("step", []))
    overrides = {"steps": 7, "replay": {"mode": "per_step"}}
    assert first == Request("dots", "style", [], ["stripes"], ["big dots"], overrides)
    assert second.prompts == ["a circle in neon style"]
    check_minicanvas([first, second])


@pytest.mark.parametrize(
    "text, message",
    [
        ("requests:\n  - {kind: style}\n", r"requests.yaml: request 1: field 'concept' is required"),
        (
            "requests:\n  - {concept: circle, kind: object}\n  - {concept: dots, kind: color}\n",
            r"requests.yaml: request 2 \('dots'\): field 'kind' must be one of object, style, person, other",
        ),
        ("requests:\n  - {concept: dots}\n", r"request 1 \('dots'\): field 'kind' is required"),
        (
            "requests:\n  - {concept: dots, kind: style, neighbours: [big dots]}\n",
            r"request 1 \('dots'\): field 'neighbours' is not a request field",
        ),
        ("requests:\n  concept: dots\n  kind: style\n", r"requests.yaml: 'requests' must be a non-empty list"),
        ("requests:\n  - {concept: dots, kind: style, prompts: a dots image}\n", r"field 'prompts' must be a list"),
        ("requests:\n  - {concept: dots, kind: style, prompts: [a circle]}\n", r"field 'prompts'.*does not mention"),
        ("requests:\n  - {concept: dots, kind: style, target: a, targets: [b]}\n", r"field 'target' and 'targets'"),
        ("requests:\n  - dots\n", r"request 1: must be a mapping"),
        ("forget: [dots]\n", r"'requests' list at the top level"),
        ("requests: [unclosed\n", r"not valid YAML"),
    ],
)
def test_malformed_request_file_names_request_and_field(tmp_path, text, message):
    with pytest.raises(RequestFileError, match=message):
        load_requests(write(tmp_path, text))


def test_unknown_override_and_missing_file_are_errors(tmp_path):
    path = write(tmp_path, "requests:\n  - {concept: dots, kind: style, overrides: {stepz: 3}}\n")
    message = r"request 1 \('dots'\): field 'overrides': 'stepz' is not a step setting"
    with pytest.raises(RequestFileError, match=message):
        load_requests(path, settings=load_config("step", []))
    with pytest.raises(RequestFileError, match="not found"):
        load_requests(tmp_path / "nowhere.yaml")


def test_overrides_read_numbers_as_the_configs_do_and_refuse_text_for_a_number(tmp_path):
    """`1e-5` is a number in a request file, as in configs/ and on the command line (PyYAML alone
    reads it as text, which reached the optimizer and failed there)."""
    path = write(tmp_path, "requests:\n  - {concept: dots, kind: style, overrides: {adamw: {eps: 1e-5}, lr: -2E+3}}\n")
    (request,) = load_requests(path, settings=load_config("step", []))
    merged = merge_overrides(load_config("step", []), request)
    assert merged.adamw.eps == 1e-5 and merged.lr == -2000.0
    path = write(tmp_path, "requests:\n  - {concept: dots, kind: style, overrides: {steps: 3x}}\n")
    message = r"request 1 \('dots'\): field 'overrides': 'steps' must be a number \(it is 300 by default\), not '3x'"
    with pytest.raises(RequestFileError, match=message):
        load_requests(path, settings=load_config("step", []))


def test_minicanvas_check_names_the_field(tmp_path):
    bad_concept, bad_kind = load_requests(
        write(tmp_path, "requests:\n  - {concept: banana, kind: object}\n  - {concept: dots, kind: object}\n")
    )
    with pytest.raises(RequestFileError, match=r"request 1 \('banana'\): field 'concept': unknown MiniCanvas concept"):
        check_minicanvas([bad_concept])
    with pytest.raises(RequestFileError, match=r"request 2 \('dots'\): field 'kind' must be 'style'"):
        check_minicanvas([bad_kind])


# ---------------------------------------------------------------- prompts


def mentioned(prompt: str) -> set[str]:
    """World concepts a prompt names, longest names first ("thin stripes" is not "stripes")."""
    found = set()
    for name in sorted(concepts.OBJECTS + concepts.STYLES, key=len, reverse=True):
        if f" {name} " in f" {prompt} ":
            found.add(name)
            prompt = f" {prompt} ".replace(f" {name} ", " | ")
    return found


def test_prompts_avoid_the_eval_template_and_held_out_concepts():
    cfg = fast_cfg()
    request = Request("dots", "style", neighbors=["big dots"])
    groups, plan = plan_prompts(request, [Request("circle", "object")], cfg, distances=None, encoder=None)
    eval_sentences = {concepts.eval_prompt(o, s) for o in concepts.OBJECTS for s in concepts.STYLES}
    everything = [p for prompts in groups.as_dict().values() for p in prompts]
    assert everything and not eval_sentences & set(everything)
    assert all("dots" in mentioned(p) for p in groups.forget)
    assert not any("dots" in mentioned(p) for p in groups.mapped), "fixed target '' removes the concept"
    trained = groups.forget + groups.retain + groups.neighbor
    seen = set().union(*(mentioned(p) for p in trained)) - {"dots"}
    assert seen == set(plan["replayed_concepts"])
    assert not seen & set(plan["held_out_concepts"]) and len(plan["held_out_concepts"]) >= 8
    assert "circle" not in seen and all("circle" in mentioned(p) for p in groups.forgotten)


def test_neighbours_of_earlier_requests_stay_replayed():
    request, earlier = (
        Request("star", "object", neighbors=["plus sign"]), Request("circle", "object", neighbors=["ring"])
    )
    _, without = plan_prompts(
        request, [earlier], fast_cfg("retain.earlier_neighbors=false"), distances=None, encoder=None
    )
    assert "ring" in without["held_out_concepts"]  # held out by the seeded draw
    groups, plan = plan_prompts(request, [earlier], fast_cfg(), distances=None, encoder=None)
    assert "ring" in plan["retain_replayed"] and "ring" not in plan["held_out_concepts"]
    assert any("ring" in mentioned(p) for p in groups.retain)

    real = Request("van gogh", "style", prompts=["a tree by van gogh"], neighbors=["monet"])
    groups, _ = plan_prompts(Request("picasso", "style", prompts=["a cat by picasso"], neighbors=["braque"]), [real],
                             fast_cfg("world=none", "retain.prompts=[a dog]"),
                             distances=None, encoder=None)  # fmt: skip
    assert groups.retain == ["a dog", "a tree by monet"]
    assert groups.retain_touched == [False, True]  # `monet` was chosen as a neighbour by an earlier request


def test_extra_templates_add_retain_sentences_but_never_the_evaluations():
    request = Request("star", "object", neighbors=["plus sign"])
    plain, _ = plan_prompts(request, [], fast_cfg(), distances=None, encoder=None)
    extra = "a {style} style {object}"
    groups, _ = plan_prompts(request, [], fast_cfg(f"retain.extra_templates=['{extra}']"), distances=None, encoder=None)
    added = [p for p in groups.retain if p not in plain.retain]
    assert added and all(re.fullmatch(r"a .+ style .+", p) for p in added)
    assert len(groups.retain_touched) == len(groups.retain) and set(plain.retain) < set(groups.retain)
    assert not any(p in groups.forget for p in added)  # the retain replay's only
    for template, message in ((concepts.EVAL_TEMPLATE, "the evaluation's sentence"),
                              ("a  {object} in {style}   style", "the evaluation's sentence"),
                              ("a {object} drawing", "must hold"),
                              ("a {object} drawn in {style} style", r"does not know \['drawn'\]")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            plan_prompts(request, [], fast_cfg(f"retain.extra_templates=['{template}']"), distances=None, encoder=None)
    with pytest.raises(ValueError, match=r"retain.extra_templates writes MiniCanvas's .* world='real'"):
        plan_prompts(Request("star", "other", prompts=["a star"]), [],
                     fast_cfg("world=real", f"retain.extra_templates=['{extra}']"), None, None)  # fmt: skip


def test_a_held_out_paraphrase_writes_no_prompt_of_the_step():
    """`held_out_paraphrases`: the world's paraphrase held out is in no group; every other prompt stays."""
    request, earlier = Request("star", "object", neighbors=["plus sign"]), Request("circle", "object", targets=["ring"])
    plain, _ = plan_prompts(request, [earlier], fast_cfg(), distances=None, encoder=None)
    held = concepts.PARAPHRASE_TEMPLATES[1]  # "a drawing of a {object} , {style} style"
    groups, _ = plan_prompts(request, [earlier], fast_cfg(f"held_out_paraphrases=['{held}']"), None, None)
    in_held = re.compile(r"a drawing of a .*, .* style")  # the mapped prompts too, the concept taken out
    for group, prompts in groups.as_dict().items():
        before = getattr(plain, group)
        assert not any(in_held.fullmatch(p) for p in prompts), group
        assert prompts == [p for p in before if not in_held.fullmatch(p)], group
    assert any(in_held.fullmatch(p) for p in plain.forget + plain.retain + plain.neighbor + plain.forgotten)
    for setting, message in ((f"['{concepts.EVAL_TEMPLATE}']", "is not one of the world's paraphrases"),
                             (str(concepts.PARAPHRASE_TEMPLATES).replace('"', "'"), "every paraphrase held out")):
        with pytest.raises(ValueError, match=message):
            plan_prompts(request, [], fast_cfg(f"held_out_paraphrases={setting}"), distances=None, encoder=None)
    with pytest.raises(ValueError, match=r"held_out_paraphrases holds MiniCanvas's .* world='real'"):
        plan_prompts(Request("star", "other", prompts=["a star"]), [],
                     fast_cfg("world=real", f"held_out_paraphrases=['{held}']"), None, None)  # fmt: skip


def test_concept_templates_write_the_forget_neighbour_and_forgotten_prompts_in_more_sentences():
    request, earlier = Request("star", "object", neighbors=["plus sign"]), Request("circle", "object", targets=["ring"])
    plain, _ = plan_prompts(request, [earlier], fast_cfg(), distances=None, encoder=None)
    groups, _ = plan_prompts(request, [earlier], fast_cfg("concept_templates=['a {style} style {object}']"),
                             distances=None, encoder=None)  # fmt: skip
    styles = {p.split(" in ")[1].removesuffix(" style") for p in plain.forget if p.startswith("a picture of a star in")}
    for group, concept in (("forget", "star"), ("neighbor", "plus sign"), ("forgotten", "circle")):
        added = [p for p in getattr(groups, group) if p not in getattr(plain, group)]
        assert sorted(added) == sorted(f"a {s} style {concept}" for s in styles), group  # each replayed style once
    # each new prompt mapped in its own form (fast_cfg's fixed target "" takes the concept out)
    assert groups.mapped == [replace_concept(p, "star", "") for p in groups.forget]
    assert groups.retain == plain.retain  # the retained pairs stay in the world's paraphrases (retain.extra_templates)
    with pytest.raises(ValueError, match=r"concept_templates: .* is the evaluation's sentence"):
        plan_prompts(request, [], fast_cfg(f"concept_templates=['{concepts.EVAL_TEMPLATE}']"), None, None)
    real = Request("star", "other", prompts=["a star"])
    with pytest.raises(ValueError, match=r"concept_templates writes MiniCanvas's concepts .* world='real'"):
        plan_prompts(real, [], fast_cfg("world=real", "concept_templates=['{style} , {object}']"), None, None)


def test_anchor_templates_write_the_retained_pairs_for_the_anchor_alone():
    request = Request("star", "object", neighbors=["plus sign"])
    plain, _ = plan_prompts(request, [], fast_cfg(), distances=None, encoder=None)
    setting = "regularizers.key_value_anchor.templates"
    groups, _ = plan_prompts(request, [], fast_cfg(f"{setting}=['{{style}} , {{object}}']"), distances=None,
                             encoder=None)  # fmt: skip
    assert plain.anchored == [] and groups.retain == plain.retain  # never replayed
    pairs = [p for p in plain.retain if re.fullmatch(r"a picture of a .+ in .+ style", p)]  # the pairs, in one form
    assert len(groups.anchored) == len(pairs) and all(re.fullmatch(r"[^,]+ , [^,]+", p) for p in groups.anchored)
    with pytest.raises(ValueError, match=rf"{setting}: .* is the evaluation's sentence"):
        plan_prompts(request, [], fast_cfg(f"{setting}=['{concepts.EVAL_TEMPLATE}']"), distances=None, encoder=None)
    real = Request("star", "other", prompts=["a star"])
    with pytest.raises(ValueError, match=r"templates writes MiniCanvas's retained .* world='real'"):
        plan_prompts(real, [], fast_cfg("world=real", f"{setting}=['{{style}} , {{object}}']"), None, None)


def test_targets_of_earlier_requests_stay_replayed_when_asked():
    request, earlier = Request("star", "object", neighbors=["plus sign"]), Request("circle", "object", targets=["ring"])
    _, default = plan_prompts(request, [earlier], fast_cfg(), distances=None, encoder=None)
    assert "ring" in default["held_out_concepts"]  # held out by the seeded draw, and off by default
    groups, plan = plan_prompts(
        request, [earlier], fast_cfg("retain.earlier_targets=true"), distances=None, encoder=None
    )
    assert "ring" in plan["retain_replayed"] and "ring" not in plan["held_out_concepts"]
    assert any("ring" in mentioned(p) for p in groups.retain)

    real = Request("van gogh", "style", prompts=["a tree by van gogh"], targets=["a painter"])
    groups, _ = plan_prompts(Request("picasso", "style", prompts=["a cat by picasso"]), [real],
                             fast_cfg("world=none", "retain.prompts=[a dog]", "retain.earlier_targets=true"),
                             distances=None, encoder=None)  # fmt: skip
    assert groups.retain == ["a dog", "a tree by a painter"]
    assert groups.retain_touched == [False, True]  # `a painter` was an earlier request's target


def test_real_model_neighbours_come_from_the_concept_bank(tmp_path):
    bank = tmp_path / "bank.yaml"
    bank.write_text("style: [Claude Monet, Van Gogh, Rembrandt, pixel art]\nobject: [dog]\n")
    cfg = fast_cfg("world=none", "neighbors.mode=score", f"neighbors.pool={bank}", "neighbors.top_k=2",
                   "retain.prompts=[a photo of a dog]")
    request = Request("Van Gogh", "style", prompts=["a painting by Van Gogh", "a sunflower field by Van Gogh"])
    # a stand-in for the teacher's score distance: the closer the name's length, the closer the concept
    by_length = lambda concept, others: torch.tensor([abs(len(o) - len(concept)) for o in others], dtype=torch.float)  # noqa: E731
    groups, plan = plan_prompts(request, [Request("Rembrandt", "style", prompts=["a Rembrandt"])], cfg, by_length, None)
    assert plan["neighbors"]["chosen"] == ["pixel art", "Claude Monet"]  # the forgotten Rembrandt is not offered
    assert groups.neighbor == [p.replace("Van Gogh", n) for n in ("pixel art", "Claude Monet") for p in request.prompts]
    assert groups.retain == ["a photo of a dog"]

    with pytest.raises(FileNotFoundError, match="concept bank"):
        missing = fast_cfg("world=none", "neighbors.mode=score", f"neighbors.pool={tmp_path / 'nope.yaml'}")
        plan_prompts(request, [], missing, by_length, None)


# ---------------------------------------------------------------- objectives and score distance


@pytest.fixture(scope="module")
def networks(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    teacher = Denoiser(pipe.unet.requires_grad_(False).eval())
    return teacher, PromptEncoder(pipe.tokenizer, pipe.text_encoder)


def test_forget_mapping_draws_its_timesteps_in_its_range_and_refuses_others():
    draw = GlobalBatch(seed=0)
    assert ForgetMapping(training_scheduler(), 999, draw).t_max == 999
    with pytest.raises(ValueError, match=r"t_max=1000.*<= 999"):
        ForgetMapping(training_scheduler(), 1000, draw)
    with pytest.raises(ValueError, match=r"t_min=700, t_max=600"):
        ForgetMapping(training_scheduler(), 600, draw, t_min=700)

    z0 = torch.zeros(64, 4, 2, 2)
    drawn = torch.cat([ForgetMapping(training_scheduler(), 600, draw, t_min=200).rows(z0, None, None).t
                       for _ in range(8)])  # fmt: skip
    assert drawn.min() >= 200 and drawn.max() <= 600
    assert drawn.min() < 220 and drawn.max() > 580  # the whole range, not a corner of it
    # t_min 0 draws the published U{0, ..., t_max}, timestep for timestep
    from_zero = ForgetMapping(training_scheduler(), 600, GlobalBatch(seed=5), t_min=0).rows(z0, None, None).t
    assert torch.equal(from_zero, GlobalBatch(seed=5).randint(601, len(z0)))


def test_a_setting_added_since_a_checkpoint_changes_nothing_at_its_default():
    before = {"lr": 1e-4, "replay": {"bank_size": 32}}  # written before t_min existed
    defaults = {"t_min": 0, "lr": 1e-4, "replay": {"bank_size": 32, "mean_weight": 0.0}}
    now = {**before, "t_min": 0, "replay": {"bank_size": 32, "mean_weight": 0.0}}
    assert settings_changes(before, now, defaults) == []
    assert settings_changes(before, {**before, "t_min": 300}, defaults) == ["t_min: (unset) -> 300"]
    assert settings_changes(before, {**before, "lr": 3e-4, "t_min": 0}, defaults) == ["lr: 0.0001 -> 0.0003"]
    assert settings_changes({**before, "t_min": 200}, {**before, "t_min": 0}, defaults) == ["t_min: 200 -> 0"]


def test_each_objective_is_zero_when_student_equals_teacher(networks):
    teacher, encoder = networks
    student_unet = copy.deepcopy(teacher.unet).requires_grad_(True)
    student = Denoiser(student_unet)
    scheduler = training_scheduler()
    torch.manual_seed(0)
    z0 = torch.randn(2, *teacher.latent_shape)
    retain = encoder(["a ring in neon style", "a square in dots style"])
    forget, mapped = encoder(["a star in mosaic style"] * 2), encoder(["a star in sketch style"] * 2)
    draw = GlobalBatch(seed=0)
    for objective in (RetainReplay(scheduler, draw), NeighborPreservation(scheduler, draw),
                      ForgottenReplay(scheduler, draw), UnconditionalReplay(scheduler, draw)):  # fmt: skip
        assert objective(student, teacher, z0, retain).item() == 0.0
    assert ParameterAnchor()(student_unet, teacher.unet).item() == 0.0
    assert ForgetMapping(scheduler, 600, draw)(student, teacher, z0, forget, mapped).item() > 0.0

    with torch.no_grad():
        next(p for n, p in student_unet.named_parameters() if ".attn2.to_k." in n).add_(0.05)
    assert RetainReplay(scheduler, draw)(student, teacher, z0, retain).item() > 0.0
    assert ParameterAnchor()(student_unet, teacher.unet).item() > 0.0


def test_relative_forget_loss_is_the_share_of_the_way_to_the_target_left(networks):
    teacher, encoder = networks
    scheduler = training_scheduler()
    z0 = torch.randn(3, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    forget, mapped = encoder(["a star in mosaic style"] * 3), encoder(["a square in mosaic style"] * 3)

    def relative(student: Denoiser) -> float:
        objective = ForgetMapping(scheduler, 999, GlobalBatch(seed=3), scale="relative")
        return objective(student, teacher, z0, forget, mapped).item()

    class AnswersMapped(Denoiser):  # reads the mapped prompt whatever it is given
        def __call__(self, x_t, t, condition):
            return super().__call__(x_t, t, mapped[: len(x_t)])

    # The student that is still the teacher has the whole way to go; one that answers the forget
    # prompt as the teacher answers the mapped prompt has none left.
    assert relative(Denoiser(copy.deepcopy(teacher.unet))) == pytest.approx(1.0, rel=1e-4)
    assert relative(AnswersMapped(teacher.unet)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="loss_scale"):
        ForgetMapping(scheduler, 600, GlobalBatch(seed=0), scale="huber")


def test_overshoot_moves_the_forget_target_past_the_mapped_prompt_away_from_the_concept(networks):
    teacher, encoder = networks
    scheduler = training_scheduler()
    z0 = torch.randn(3, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    forget, mapped = encoder(["a star in mosaic style"] * 3), encoder(["a square in mosaic style"] * 3)

    class AnswersMapped(Denoiser):  # reads the mapped prompt whatever it is given
        def __call__(self, x_t, t, condition):
            return super().__call__(x_t, t, mapped[: len(x_t)])

    def loss(student: Denoiser, overshoot: float) -> float:
        objective = ForgetMapping(scheduler, 999, GlobalBatch(seed=3), overshoot=overshoot)
        return objective(student, teacher, z0, forget, mapped).item()

    # target = T(p_m) + 0.5 (T(p_m) - T(p_f)): the teacher is 1.5 gaps from it, the mapped answer 0.5
    gap = loss(Denoiser(copy.deepcopy(teacher.unet)), 0.0)
    assert loss(AnswersMapped(teacher.unet), 0.0) == pytest.approx(0.0, abs=1e-9)
    assert loss(Denoiser(copy.deepcopy(teacher.unet)), 0.5) == pytest.approx(1.5**2 * gap, rel=1e-4)
    assert loss(AnswersMapped(teacher.unet), 0.5) == pytest.approx(0.5**2 * gap, rel=1e-4)


def test_relative_retain_loss_is_zero_for_the_teacher_and_scaled_by_its_conditional_signal(networks):
    teacher, encoder = networks
    scheduler = training_scheduler()
    z0 = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    retain, empty = encoder(["a ring in neon style", "a square in dots style"]), encoder([""])
    student_unet = copy.deepcopy(teacher.unet)

    def losses(scale):
        objective = RetainReplay(scheduler, GlobalBatch(seed=5), scale=scale)
        return objective(Denoiser(student_unet), teacher, z0, retain, empty).item()

    assert losses("relative") == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        weight = next(p for n, p in student_unet.named_parameters() if ".attn2.to_v." in n)
        weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    x_t, t = noised(scheduler, z0, 1000, GlobalBatch(seed=5))  # the draws the loss makes
    with torch.no_grad():
        conditional, unconditional = teacher(x_t, t, retain), teacher(x_t, t, empty[[0, 0]])
        error = (Denoiser(student_unet)(x_t, t, retain) - conditional).pow(2).flatten(1).mean(1)
        signal = (conditional - unconditional).pow(2).flatten(1).mean(1)
    assert error.mean() > 1e-6
    assert losses("mse") == pytest.approx(error.mean().item(), rel=1e-3)
    assert losses("relative") == pytest.approx((error / signal).mean().item(), rel=1e-3)
    with pytest.raises(ValueError, match="empty prompt"):
        RetainReplay(scheduler, GlobalBatch(seed=5), scale="relative")(Denoiser(student_unet), teacher, z0, retain)


def test_mean_weight_counts_the_part_of_a_replay_error_common_to_every_position_more(networks):
    teacher, encoder = networks
    scheduler = training_scheduler()
    z0 = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    retain = encoder(["a ring in neon style", "a square in dots style"])
    channels, height, width = teacher.latent_shape
    checker = (torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2 * 2.0 - 1.0  # zero spatial mean

    class Off(Denoiser):  # the teacher plus a fixed error of size 0.1 at every element
        def __init__(self, unet, error):
            super().__init__(unet)
            self.error = error

        def __call__(self, x_t, t, condition):
            return super().__call__(x_t, t, condition) + self.error

    cast, texture = Off(teacher.unet, torch.full((channels, 1, 1), 0.1)), Off(teacher.unet, 0.1 * checker)
    for weight in (0.0, 256.0):
        for objective in (RetainReplay(scheduler, GlobalBatch(seed=5), mean_weight=weight),
                          UnconditionalReplay(scheduler, GlobalBatch(seed=5), mean_weight=weight)):  # fmt: skip
            # A colour cast (the same error everywhere) costs 1 + weight times what a texture of
            # the same size whose spatial mean is zero costs; without the weight they cost alike.
            assert objective(texture, teacher, z0, retain).item() == pytest.approx(0.01, rel=1e-4)
            assert objective(cast, teacher, z0, retain).item() == pytest.approx(0.01 * (1 + weight), rel=1e-4)
    with pytest.raises(ValueError, match="mean_weight"):
        RetainReplay(scheduler, GlobalBatch(seed=5), mean_weight=-1.0)


def test_guided_replay_follows_classifier_free_guidance(networks, tiny_pipeline_dir):
    teacher, encoder = networks
    scheduler_config = load_pipeline(tiny_pipeline_dir).scheduler.config
    prompts, empty = encoder(["a star in mosaic style", "a ring in neon style"]), encoder([""])
    x, t = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    guided = TeacherSampler(teacher, scheduler_config, 2, 8, guidance=4.0, empty=empty)
    with torch.no_grad():
        conditional, unconditional = teacher(x, t.expand(2), prompts), teacher(x, t.expand(2), empty[[0, 0]])
        expected = unconditional + 4.0 * (conditional - unconditional)
        assert torch.allclose(guided.predict(x, t, prompts), expected, atol=1e-5)
        assert torch.equal(TeacherSampler(teacher, scheduler_config, 2, 8).predict(x, t, prompts), conditional)
    guided.sample(prompts, torch.Generator().manual_seed(1))
    assert guided.evaluations == 2 * 2 * 2  # samples x steps x (conditional + unconditional)
    with pytest.raises(ValueError, match="empty prompt"):
        TeacherSampler(teacher, scheduler_config, 2, 8, guidance=4.0)


def test_score_distance_is_zero_for_identical_prompts_and_symmetric(networks):
    teacher, encoder = networks
    ring, square = "a ring in neon style", "a square in dots style"
    a, b = encoder([ring, square])
    assert score_distance(teacher.unet, a, a, num_latents=4, seed=1).item() == 0.0
    d_ab = score_distance(teacher.unet, a, b, num_latents=4, seed=1)
    d_ba = score_distance(teacher.unet, b, a, num_latents=4, seed=1)
    assert d_ab.item() > 0.0 and d_ab.item() == pytest.approx(d_ba.item(), rel=1e-6)
    batched = score_distance(teacher.unet, encoder([ring, ring]), encoder([ring, square]), num_latents=4, seed=1)
    assert batched.shape == (2,) and batched[0] == 0.0 and batched[1].item() == pytest.approx(d_ab.item(), rel=1e-5)


def test_score_distances_compute_each_sentence_once(networks):
    teacher, encoder = networks
    probe = ScoreProbe(teacher.latent_shape, 4, 1, training_scheduler())
    distances = ScoreDistances(teacher, encoder, probe)
    ring, square, star = "a ring in neon style", "a square in dots style", "a star in neon style"
    first = distances(ring, [square, star])
    before = teacher.evaluations
    again = distances(star, [square, ring])  # every sentence already known: no network call
    assert teacher.evaluations == before and again[1] == first[1]
    assert first[0].item() == pytest.approx(
        score_distance(teacher.unet, *encoder([ring, square]), num_latents=4, seed=1).item(), rel=1e-5
    )
    distances(ring, ["a heart in neon style"])
    assert teacher.evaluations == before + 4  # the new sentence alone, at the 4 probe latents


# ---------------------------------------------------------------- the Lightning module


def test_score_targets_per_prompt_or_one_for_the_request():
    # hand-made distances: prompt A is closest to "b", B and C to "a"; on average "c" is closest
    table = {"A dots": [5.0, 0.0, 1.0], "B dots": [0.0, 6.0, 1.0], "C dots": [0.0, 6.0, 1.0]}

    def distances(prompt, _candidates):
        return torch.tensor(table[prompt])

    prompts = list(table)
    per_prompt, record = choose_targets("score", prompts, "dots", ["a", "b", "c"], 0, distances, scope="prompt")
    assert per_prompt == ["b", "a", "a"] and record["scope"] == "prompt"
    per_request, record = choose_targets("score", prompts, "dots", ["a", "b", "c"], 0, distances, scope="request")
    assert per_request == ["c", "c", "c"] and record["counts"] == {"c": 3}
    with pytest.raises(ValueError, match=r"target.scope"):
        choose_targets("score", prompts, "dots", ["a"], 0, distances, scope="sentence")


def test_protected_neighbours_are_target_candidates_only_with_among_neighbors():
    def distances(_prompt, sentences):  # `plus sign` is closest to `cross`, then `ring`
        return torch.tensor([0.0 if "plus sign" in s else 1.0 if "ring" in s else 2.0 for s in sentences])

    request = Request("cross", "object", neighbors=["plus sign", "diamond"])
    for among, target in (("false", "ring"), ("true", "plus sign")):
        cfg = fast_cfg("target.mode=score", f"target.among_neighbors={among}")
        groups, plan = plan_prompts(request, [], cfg, distances, encoder=None)
        assert list(plan["targets"]["counts"]) == [target]
        assert ("plus sign" in plan["targets"]["candidates"]) == (among == "true")
        assert any("plus sign" in mentioned(p) for p in groups.neighbor)  # protected either way


def plane_distances(prompt, sentences):
    """Squared distances between points of a plane: `ring` is the closest candidate to `cross`, but the
    protected `plus sign` lies half way there; `triangle` is a little farther, with nothing between."""
    where = {"cross": (0.0, 0.0), "plus sign": (1.0, 0.0), "ring": (2.0, 0.0), "triangle": (0.0, 2.2)}

    def point(sentence):
        return next((xy for c, xy in where.items() if c in mentioned(sentence)), (10.0, 10.0))

    (x, y) = point(prompt)
    return torch.tensor([(x - u) ** 2 + (y - v) ** 2 for u, v in map(point, sentences)])


def test_no_target_with_a_protected_neighbour_between_it_and_the_concept_with_between_margin():
    distances = plane_distances
    request = Request("cross", "object", neighbors=["plus sign"])
    _, off = plan_prompts(request, [], fast_cfg("target.mode=score"), distances, encoder=None)
    assert list(off["targets"]["counts"]) == ["ring"] and "between" not in off["targets"]
    # plus sign to cross 1, to ring 1, both under 0.72 x 4; to triangle 5.84, over 0.72 x 4.84
    _, plan = plan_prompts(request, [], fast_cfg("target.mode=score", "target.between_margin=0.72"), distances, None)
    assert list(plan["targets"]["counts"]) == ["triangle"]
    assert plan["targets"]["between"] == {"ring": ["plus sign"]}
    assert "ring" not in plan["targets"]["candidates"]
    # every plan records its target's value, the switch on or off: max(d(cross, n), d(target, n)) / d(cross, target)
    assert off["targets"]["between_ratio"] == pytest.approx(1 / 4)
    assert plan["targets"]["between_ratio"] == pytest.approx(5.84 / 4.84, abs=1e-4)
    # a margin so small that nothing lies between leaves the choice as it was
    _, plan = plan_prompts(request, [], fast_cfg("target.mode=score", "target.between_margin=0.2"), distances, None)
    assert list(plan["targets"]["counts"]) == ["ring"] and "between" not in plan["targets"]


def test_a_target_with_a_protected_neighbour_between_trains_with_between_overrides():
    request = Request("cross", "object", neighbors=["plus sign"])
    cfg = fast_cfg("target.mode=score", "target.between_overrides_margin=0.72", "neighbors.close_margin=0")
    _, plan = plan_prompts(request, [], cfg, plane_distances, encoder=None)  # onto `ring`, ratio 1 / 4
    assert dict(cfg.target.between_overrides) == {"forget_overshoot": 0.5}  # the default
    trained = plan_settings(cfg, plan, request)
    assert trained.forget_overshoot == 0.5 and cfg.forget_overshoot == 0.0
    assert plan["targets"]["between_overrides"] == {"forget_overshoot": 0.5}  # recorded with the target
    assert {**OmegaConf.to_container(trained), "forget_overshoot": 0.0} == OmegaConf.to_container(cfg)  # nothing else
    # a target with nothing between (`triangle`, ratio 1.21), or the switch off (the default), keeps the settings
    onto_triangle = Request("cross", "object", neighbors=["plus sign"], targets=["triangle"])
    _, far = plan_prompts(onto_triangle, [], cfg, plane_distances, encoder=None)
    assert far["targets"]["between_ratio"] > 1
    assert plan_settings(cfg, far, onto_triangle).forget_overshoot == 0.0
    assert "between_overrides" not in far["targets"]
    _, off = plan_prompts(request, [], fast_cfg("target.mode=score"), plane_distances, encoder=None)
    assert plan_settings(fast_cfg("target.mode=score"), off, request).forget_overshoot == 0.0
    # the request's own overrides win, as over target.chain_overrides
    own = dataclasses.replace(request, overrides={"forget_overshoot": 0.2})
    assert plan_settings(cfg, plan, own).forget_overshoot == 0.2
    # settings that decide the plan, or no step setting at all, are refused
    for bad, message in (("{neighbors: {top_k: 4}}", "decide the plan"), ("{forget_overshot: 1}", "forget_overshot")):
        wrong = fast_cfg("target.mode=score", "target.between_overrides_margin=0.72", f"target.between_overrides={bad}")
        with pytest.raises(ValueError, match=f"between_overrides.*{message}"):
            plan_settings(wrong, plan, request)


def test_a_neighbour_far_nearer_than_the_target_trains_with_close_overrides():
    request = Request("cross", "object", neighbors=["plus sign"])
    cfg = fast_cfg("target.mode=score", "neighbors.close_margin=0.22")
    assert dict(cfg.neighbors.close_overrides) == {"lambda_n": 100.0}  # the default
    # onto `ring`: plus sign lies at 1 from cross, ring at 4 (squared distances of the plane)
    _, plan = plan_prompts(request, [], cfg, plane_distances, encoder=None)
    assert plan["neighbors"]["close_ratio"] == pytest.approx(1 / 4)
    assert plan_settings(cfg, plan, request).lambda_n == cfg.lambda_n == 25.0
    assert "close_overrides" not in plan["neighbors"]
    # onto `triangle`, at 4.84: the neighbour is nearer than 0.22 of that
    onto_triangle = Request("cross", "object", neighbors=["plus sign"], targets=["triangle"])
    _, far = plan_prompts(onto_triangle, [], cfg, plane_distances, encoder=None)
    assert far["neighbors"]["close_ratio"] == pytest.approx(1 / 4.84, abs=1e-4)
    trained = plan_settings(cfg, far, onto_triangle)
    assert trained.lambda_n == 100.0 and far["neighbors"]["close_overrides"] == {"lambda_n": 100.0}
    assert {**OmegaConf.to_container(trained), "lambda_n": 25.0} == OmegaConf.to_container(cfg)  # nothing else
    # off: the value is recorded, the settings kept
    off_cfg = fast_cfg("target.mode=score", "neighbors.close_margin=0")
    _, off = plan_prompts(onto_triangle, [], off_cfg, plane_distances, encoder=None)
    assert off["neighbors"]["close_ratio"] == far["neighbors"]["close_ratio"]
    assert plan_settings(off_cfg, off, onto_triangle).lambda_n == 25.0
    # both rules apply to one plan, each recorded; the request's own overrides win over both
    both = fast_cfg("target.mode=score", "neighbors.close_margin=0.3", "target.between_overrides_margin=0.72")
    _, plan = plan_prompts(request, [], both, plane_distances, encoder=None)  # onto ring: 1 / 4 for both values
    trained = plan_settings(both, plan, request)
    assert (trained.forget_overshoot, trained.lambda_n) == (0.5, 100.0)
    assert "between_overrides" in plan["targets"] and "close_overrides" in plan["neighbors"]
    own = dataclasses.replace(request, overrides={"lambda_n": 60.0})
    assert plan_settings(both, plan, own).lambda_n == 60.0
    wrong = fast_cfg("target.mode=score", "neighbors.close_margin=0.3", "neighbors.close_overrides={seed: 3}")
    with pytest.raises(ValueError, match=r"close_overrides: \['seed'\] decide the plan"):
        plan_settings(wrong, far, onto_triangle)
    # of the neighbour settings, the twins only weigh rows every plan writes: they may be switched on here
    twins_on = "neighbors.close_overrides={neighbors: {twins: true}}"
    twins = fast_cfg("target.mode=score", "neighbors.close_margin=0.3", twins_on)
    trained = plan_settings(twins, far, onto_triangle)
    assert trained.neighbors.twins and not twins.neighbors.twins and trained.neighbors.top_k == twins.neighbors.top_k
    for bad in ("{neighbors: {top_k: 4}}", "{neighbors: {twins: true, top_k: 4}}"):
        wrong = fast_cfg("target.mode=score", "neighbors.close_margin=0.3", f"neighbors.close_overrides={bad}")
        with pytest.raises(ValueError, match=r"close_overrides: \['neighbors'\] decide the plan"):
            plan_settings(wrong, far, onto_triangle)


def test_the_module_of_a_plan_with_a_neighbour_between_aims_past_its_target(tiny_pipeline_dir):
    request = Request("circle", "object", neighbors=["ring"])
    every = fast_cfg("target.mode=score", "target.between_overrides_margin=100")  # any target's ratio is under it
    module, plan = build_module(tiny_pipeline_dir, request, every)
    assert plan["targets"]["between_overrides"] == {"forget_overshoot": 0.5}
    assert module.objectives["forget"].overshoot == 0.5
    module, plan = build_module(tiny_pipeline_dir, request, fast_cfg("target.mode=score"))  # off: the default
    assert "between_ratio" in plan["targets"] and "between_overrides" not in plan["targets"]
    assert module.objectives["forget"].overshoot == 0.0


def test_the_module_of_a_plan_with_a_neighbour_far_nearer_than_its_target_trains_the_twins_its_rule_switches_on(
    tiny_pipeline_dir,
):
    request = Request("circle", "object", neighbors=["ring"])
    twins_on = "neighbors.close_overrides={lambda_n: 100.0, neighbors: {twins: true}}"
    every = fast_cfg("target.mode=score", "neighbors.close_margin=100", twins_on)  # any plan's ratio is under it
    module, plan = build_module(tiny_pipeline_dir, request, every)
    assert plan["neighbors"]["close_overrides"] == {"lambda_n": 100.0, "neighbors": {"twins": True}}
    module.setup()  # encodes the prompts: the twins' rows with them
    assert module.weights["twin"] == module.weights["neighbor"] == 100.0 and module.twin_table is not None
    module, _ = build_module(tiny_pipeline_dir, request, fast_cfg("target.mode=score", "neighbors.close_margin=0"))
    module.setup()
    assert module.weights["twin"] == 0.0 and module.twin_table is None


def test_target_and_the_concepts_closest_to_it_join_the_neighbour_replay_with_protect():
    def distances(_prompt, sentences):  # `plus sign` is closest to anything, then ring, triangle, heart
        order = {"plus sign": 0.0, "ring": 1.0, "triangle": 1.5, "heart": 1.8}
        return torch.tensor([next((d for c, d in order.items() if c in s), 2.0) for s in sentences])

    request = Request("cross", "object", neighbors=["plus sign", "diamond"])
    off_groups, off = plan_prompts(request, [], fast_cfg("target.mode=score"), distances, encoder=None)
    groups, plan = plan_prompts(request, [], fast_cfg("target.mode=score", "target.protect=3"), distances, None)
    assert list(plan["targets"]["counts"]) == list(off["targets"]["counts"]) == ["ring"]
    assert plan["targets"]["protected"]["chosen"] == ["ring", "triangle", "heart"]  # neighbours are not offered
    nearby = {"ring", "triangle", "heart"}
    assert not nearby & {c for p in off_groups.neighbor for c in mentioned(p)} and "protected" not in off["targets"]
    assert nearby <= {c for p in groups.neighbor for c in mentioned(p)}
    assert nearby <= set(plan["replayed_concepts"]) and not nearby & set(plan["held_out_concepts"])


def test_targets_of_earlier_requests_are_no_candidates_unless_reuse():
    def distances(_prompt, sentences):  # `ring` is closest to `cross`, then `triangle`
        return torch.tensor([0.0 if "ring" in s else 1.0 if "triangle" in s else 2.0 for s in sentences])

    circle = Request("circle", "object", targets=["ring"], neighbors=["heart"])  # as the loop carries it out
    cross = Request("cross", "object", neighbors=["plus sign"])
    for reuse, target in (("false", "triangle"), ("true", "ring")):
        cfg = fast_cfg("target.mode=score", f"target.reuse={reuse}")
        _, plan = plan_prompts(cross, [circle], cfg, distances, encoder=None)
        assert list(plan["targets"]["counts"]) == [target]
    # a request's own candidates are kept; and with every candidate taken, the taken ones are offered again
    own = dataclasses.replace(cross, targets=["ring"])
    _, plan = plan_prompts(own, [circle], fast_cfg("target.mode=score"), distances, None)
    assert list(plan["targets"]["counts"]) == ["ring"]
    shapes = [c for c in concepts.OBJECTS if c not in ("cross", "circle")]
    _, plan = plan_prompts(
        cross, [dataclasses.replace(circle, targets=shapes)], fast_cfg("target.mode=score"), distances, None
    )
    assert list(plan["targets"]["counts"]) == ["ring"]


def test_excluded_concepts_are_no_candidates_and_excluding_every_one_is_refused():
    request = Request("cross", "object", neighbors=["plus sign"])
    _, plan = plan_prompts(request, [], fast_cfg("target.mode=score", "target.exclude=[ring]"), plane_distances, None)
    assert list(plan["targets"]["counts"]) == ["triangle"] and "ring" not in plan["targets"]["candidates"]
    own = dataclasses.replace(request, targets=["ring", "heart"])  # a request's own candidates too
    _, plan = plan_prompts(own, [], fast_cfg("target.mode=score", "target.exclude=[ring]"), plane_distances, None)
    assert plan["targets"]["candidates"] == ["heart"]
    with pytest.raises(ValueError, match=r"target.exclude \['ring', 'heart'\] leaves no target candidate for 'cross'"):
        plan_prompts(own, [], fast_cfg("target.mode=score", "target.exclude=[ring,heart]"), plane_distances, None)


def test_concepts_later_requests_will_forget_are_no_candidates():
    def distances(_prompt, sentences):  # `triangle` is closest to `cross`, then `crescent`
        return torch.tensor([0.0 if "triangle" in s else 1.0 if "crescent" in s else 2.0 for s in sentences])

    cross = Request("cross", "object", neighbors=["plus sign"])
    for avoid, target in (("true", "crescent"), ("false", "triangle")):
        cfg = fast_cfg("target.mode=score", f"target.avoid_pending={avoid}")
        _, plan = plan_prompts(cross, [], cfg, distances, encoder=None, pending=["heart", "triangle"])
        assert list(plan["targets"]["counts"]) == [target]
        assert ("triangle" in plan["targets"]["candidates"]) == (avoid == "false")
    # with every candidate pending, they are offered again
    shapes = [c for c in concepts.OBJECTS if c not in ("cross", "plus sign")]
    _, plan = plan_prompts(
        cross, [], fast_cfg("target.mode=score", "target.avoid_pending=true"), distances, None, pending=shapes
    )
    assert list(plan["targets"]["counts"]) == ["triangle"]


def test_an_earlier_request_mapped_onto_the_concept_follows_it_to_its_new_target():
    def distances(_prompt, sentences):  # `mosaic` is the closest style
        return torch.tensor([0.0 if "mosaic" in s else 1.0 for s in sentences])

    stripes = Request("stripes", "style", targets=["flat color"], neighbors=["thin stripes"])  # stripes -> flat color
    dots = Request("dots", "style", targets=["pastel color"], neighbors=["big dots"])
    flat = Request("flat color", "style", neighbors=["pastel color"])
    for follow in ("true", "false"):
        cfg = fast_cfg("target.mode=score", f"target.follow={follow}")
        groups, plan = plan_prompts(flat, [stripes, dots], cfg, distances, encoder=None)
        assert list(plan["targets"]["counts"]) == ["mosaic"]
        assert not any("stripes" in mentioned(p) for p in groups.forget)  # the request's forget rows are its own
        assert any("stripes" in mentioned(p) for p in groups.forgotten)  # both stay in the forgotten replay
        if follow == "true":
            assert (
                plan["targets"]["followers"] == {"stripes": "mosaic"}
                and len(groups.forgotten_mapped) == len(groups.forgotten)
            )
            for p, teacher_prompt in zip(groups.forgotten, groups.forgotten_mapped):
                assert teacher_prompt == (replace_concept(p, "stripes", "mosaic") if "stripes" in mentioned(p) else p)
        else:
            assert groups.forgotten_mapped == [] and "followers" not in plan["targets"]


def test_chain_overrides_apply_where_an_earlier_request_was_mapped_onto_the_concept():
    cfg = fast_cfg()
    assert dict(cfg.target.chain_overrides) == {"forget_overshoot": 1.0, "lambda_forgotten": 25.0}  # the default
    cross = Request("cross", "object", targets=["triangle"])  # cross -> triangle, earlier
    triangle = Request("triangle", "object", overrides={"lambda_forgotten": 10.0})
    chained = request_settings(cfg, triangle, [cross])
    assert chained.forget_overshoot == 1.0 and chained.lambda_forgotten == 10.0  # the request's own overrides win
    plain = request_settings(cfg, Request("heart", "object"), [cross])
    assert plain.forget_overshoot == 0.0 and plain.lambda_forgotten == 5.0  # configs/step.yaml's own values
    off = OmegaConf.merge(fast_cfg(), {"target": {"chain_overrides": None}})  # null: none
    assert request_settings(off, triangle, [cross]).forget_overshoot == fast_cfg().forget_overshoot
    # a request file may set the chain's overrides for its own requests (as measured before a default changed)
    pinned = {"target": {"chain_overrides": {"forget_overshoot": 0.5}}}
    assert request_settings(cfg, Request("triangle", "object", overrides=pinned), [cross]).forget_overshoot == 0.5
    assert request_settings(cfg, Request("heart", "object", overrides=pinned), [cross]).forget_overshoot == 0.0
    misspelt = OmegaConf.merge(fast_cfg(), {"target": {"chain_overrides": {"forget_overshot": 0.5}}})
    with pytest.raises(ValueError, match=r"chain_overrides.*forget_overshot"):
        request_settings(misspelt, triangle, [cross])


def test_forgotten_replay_reads_the_teacher_at_the_followed_prompts(networks):
    teacher, encoder = networks
    draw = GlobalBatch(seed=0)
    replay = ForgottenReplay(training_scheduler(), draw)
    own, followed = encoder(["a ring in stripes style"]), encoder(["a ring in mosaic style"])
    z0 = torch.zeros(1, *teacher.latent_shape)
    assert replay.rows(z0, own).teacher[0] is own
    rows = replay.rows(z0, own, teacher_embeds=followed)
    assert rows.student is own and rows.teacher[0] is followed


def test_the_module_reads_the_teacher_at_the_followed_prompts(tiny_pipeline_dir):
    stripes = Request("stripes", "style", targets=["dots"], neighbors=["thin stripes"])  # stripes -> dots, earlier
    request = Request("dots", "style", prompts=["a ring in dots style"], targets=["sketch"], neighbors=["big dots"])
    module, plan = build_module(tiny_pipeline_dir, request, fast_cfg("target.follow=true"), forgotten_before=[stripes])
    assert plan["targets"]["followers"] == {"stripes": "sketch"}
    module.setup("fit")
    module.on_fit_start()
    calls = []
    replay = module.objectives["forgotten"]
    original = replay.rows
    replay.rows = lambda z0, embeds, empty=None, teacher_embeds=None: (
        calls.append((embeds, teacher_embeds)) or original(z0, embeds, empty, teacher_embeds)
    )
    module.losses()
    (student, teacher), = calls
    assert teacher is not None and len(teacher) == len(student)
    # "... in sketch style" read by the teacher, "... in stripes style" by the student
    assert not torch.equal(teacher.text, student.text)


@pytest.mark.parametrize("mode", list(TRAINABLE))
def test_student_gets_gradients_only_in_the_selected_group(tiny_pipeline_dir, mode):
    request = Request("dots", "style", neighbors=["big dots"])
    module, _ = build_module(tiny_pipeline_dir, request, fast_cfg(f"trainable={mode}"))
    module.setup("fit")
    module.on_fit_start()
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached here
        module.training_step(0, 0).backward()
    selected = {n for n, _ in module.unet.named_parameters() if TRAINABLE[mode](n)}
    assert selected
    for name, param in module.unet.named_parameters():
        assert (param.grad is not None) == (name in selected), name
    assert any(p.grad.abs().sum() > 0 for n, p in module.unet.named_parameters() if n in selected)
    assert all(p.grad is None for p in module.teacher.unet.parameters())


def test_sgd_leaves_a_text_direction_no_prompt_holds_as_it_was_and_adamw_does_not():
    """A key projection trained on token states of rank 3 in 8 dimensions: momentum SGD changes it only
    in their span (its step is a sum of the gradients, each an outer product with the states), AdamW's
    per-element scaling and weight decay change it everywhere."""
    torch.manual_seed(0)
    states = torch.randn(3, 8) @ torch.randn(8, 8)  # rows: the training prompts' token states
    free = torch.linalg.svd(torch.cat([states, torch.zeros(5, 8)])).Vh[-1]  # orthogonal to every one of them
    wanted = torch.randn(3, 4)
    change = {}
    for name in ("sgd", "adamw"):
        to_k = torch.nn.Linear(8, 4, bias=False)
        start = to_k.weight.detach().clone()
        optimizer = make_optimizer(load_config("step", [f"optimizer={name}", "lr=1e-2"]), to_k.parameters())
        for _ in range(20):
            optimizer.zero_grad()
            (to_k(states) - wanted).pow(2).mean().backward()
            optimizer.step()
        delta = to_k.weight.detach() - start
        assert float(((states @ delta.T).norm())) > 1e-2  # both learn on the prompts' states
        change[name] = float((delta @ free).norm() / (start @ free).norm())
    assert change["sgd"] < 1e-5 and change["adamw"] > 1e-2, change
    assert isinstance(make_optimizer(load_config("step", ["optimizer=sgd"]), [torch.zeros(1)]), torch.optim.SGD)


def test_an_unknown_optimizer_is_named_before_training(tiny_pipeline_dir):
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adamw', 'sgd'\] \(got 'adam'\)"):
        build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), fast_cfg("optimizer=adam"))


def test_teacher_never_changes_and_stays_out_of_the_checkpoint(tiny_pipeline_dir):
    cfg = fast_cfg("lr=1e-2", "warmup=1")
    module, _ = build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg)
    teacher_before = {n: p.detach().clone() for n, p in module.teacher.unet.named_parameters()}
    student_before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
    for name, param in module.teacher.unet.named_parameters():
        assert torch.equal(param, teacher_before[name]), name
    changed = {n for n, p in module.unet.named_parameters() if not torch.equal(p.detach().cpu(), student_before[n])}
    assert changed and all(".attn2." in n for n in changed)
    assert all(key.startswith("unet.") for key in module.state_dict())
    # 3 steps x (forget, retain, empty prompt, neighbour) x batch
    assert module.student.evaluations == 3 * 4 * cfg.batch


def test_the_teachers_work_outside_training_runs_at_the_training_precision(tiny_pipeline_dir, networks):
    default, _ = build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), fast_cfg())
    mixed, _ = build_module(
        tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), fast_cfg("precision=bf16-mixed")
    )
    assert default.teacher.autocast is None and mixed.teacher.autocast is torch.bfloat16  # CPU: 32-true by default

    teacher, encoder = networks
    condition = encoder(["a circle in dots style", "a ring"])
    x_t, t = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    full = teacher(x_t, t, condition)
    half = Denoiser(teacher.unet, autocast=torch.bfloat16)(x_t, t, condition)
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # it did run in bfloat16
    assert torch.allclose(half, full, atol=0.05 * full.abs().max().item())


def test_gradient_checkpointing_trains_the_same_student(tiny_pipeline_dir):
    students = []
    for setting in ("false", "true"):
        cfg = fast_cfg("steps=2", "lr=1e-2", "warmup=1", "trainable=full", f"gradient_checkpointing={setting}")
        module, _ = build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg)
        assert module.unet.is_gradient_checkpointing == (setting == "true")
        make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
        students.append(module.unet.state_dict())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(students[0].values(), load_pipeline(tiny_pipeline_dir).unet.state_dict().values())
    )
    for name, weight in students[0].items():
        assert torch.allclose(weight, students[1][name], atol=1e-5), name


@pytest.mark.parametrize("steps, every, saved_at", [(4, 2, 2), (3, 5, None)])
def test_checkpoints_are_kept_every_n_steps_but_not_after_the_last(tiny_pipeline_dir, tmp_path, steps, every, saved_at):
    cfg = fast_cfg(f"steps={steps}", f"checkpoint_every={every}")
    module, _ = build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg)
    make_trainer(cfg, checkpoint_dir=tmp_path).fit(module, train_dataloaders=step_indices(cfg))
    saved = list(tmp_path.glob("*.ckpt"))
    if saved_at is None:  # the student's pipeline folder, saved next, is the step's output
        assert saved == []
    else:
        assert [p.name for p in saved] == ["last.ckpt"]
        assert torch.load(saved[0], weights_only=False)["global_step"] == saved_at


def test_a_checkpoint_resumes_only_under_the_settings_it_was_trained_with(tiny_pipeline_dir, tmp_path):
    request, checkpoints = Request("circle", "object", neighbors=["ring"]), tmp_path / "checkpoints"
    trained = fast_cfg("steps=4", "checkpoint_every=2")
    module, _ = build_module(tiny_pipeline_dir, request, trained)
    make_trainer(trained, checkpoint_dir=checkpoints).fit(module, train_dataloaders=step_indices(trained))
    assert [p.name for p in checkpoints.glob("*.ckpt")] == ["last.ckpt"]  # as a run killed after step 2 leaves it

    # what it trains changed: refused, naming every changed setting, and nothing is written
    other = fast_cfg("steps=4", "checkpoint_every=2", "lambda_r=50", "replay.mean_weight=8")
    with pytest.raises(CheckpointError, match=r"last\.ckpt cannot be resumed") as refused:
        run_step(tiny_pipeline_dir, request, other, tmp_path / "student", checkpoint_dir=checkpoints)
    assert "lambda_r: 25.0 -> 50;" in str(refused.value) and "replay.mean_weight: 0.0 -> 8)" in str(refused.value)
    assert not (tmp_path / "student").exists()

    # where and how it runs may change: it goes on from step 2
    moved = fast_cfg("steps=4", "checkpoint_every=3", "gradient_checkpointing=true")
    record = run_step(tiny_pipeline_dir, request, moved, tmp_path / "student", checkpoint_dir=checkpoints)
    assert record["resumed_from"].endswith("last.ckpt") and record["steps"] == 4


def started_module(pipeline_dir, request: Request, *extra: str):
    """The training module of `request` on `pipeline_dir`, set up and started as `Trainer.fit` would."""
    module, _ = build_module(pipeline_dir, request, fast_cfg(*extra))
    module.setup("fit")
    module.on_fit_start()
    return module


def moved_cross_attention(module) -> None:
    """Move the student's first cross-attention value projection, so it no longer equals the teacher."""
    with torch.no_grad():  # cross-attention reads every prompt's tokens, the empty prompt's too
        next(p for n, p in module.unet.named_parameters() if ".attn2.to_v." in n).add_(0.05)


def test_the_empty_prompt_is_replayed_on_the_retain_rows(tiny_pipeline_dir):
    def losses(*extra):
        module = started_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), *extra)
        return module, module.losses()

    module, before = losses()
    assert before["unconditional"].item() == 0.0  # the student is the teacher
    moved_cross_attention(module)
    assert module.losses()["unconditional"].item() > 0.0
    assert "unconditional" not in losses("retain.unconditional=false")[1]
    assert "unconditional" not in losses("lambda_r=0")[1]  # the baselines' "no replay"


def test_loss_scale_can_make_the_replays_relative_and_leave_the_forget_mapping_mse(tiny_pipeline_dir):
    def losses(scale):
        request = Request("circle", "object", neighbors=["ring"])
        module = started_module(tiny_pipeline_dir, request, f"loss_scale={scale}")
        moved_cross_attention(module)  # a student that differs from the teacher
        return {name: loss.item() for name, loss in module.losses().items()}

    mse, relative = losses("mse"), losses("relative")
    replays_relative, forget_relative = losses("relative_replays"), losses("relative_forget")
    for name in ("forget", "retain", "neighbor"):
        assert relative[name] != pytest.approx(mse[name], rel=1e-2), name  # the two scales differ on every loss
    assert replays_relative["forget"] == pytest.approx(mse["forget"], rel=1e-4)
    assert forget_relative["forget"] == pytest.approx(relative["forget"], rel=1e-4)
    for name in ("retain", "neighbor"):
        assert replays_relative[name] == pytest.approx(relative[name], rel=1e-4), name
        assert forget_relative[name] == pytest.approx(mse[name], rel=1e-4), name
    with pytest.raises(ValueError, match="loss_scale must be one of"):
        losses("relative_everything")


def test_neighbour_twins_are_replayed_at_the_forget_rows_latents(tiny_pipeline_dir):
    def built(*extra):
        request = Request("circle", "object", neighbors=["ring", "hollow square"])
        return started_module(tiny_pipeline_dir, request, *extra)

    module = built("neighbors.twins=true")
    for prompt, variants in zip(module.groups.forget, module.groups.twins):
        assert variants == [replace_concept(prompt, "circle", n) for n in ("ring", "hollow square")], prompt
    index, forget = module.forget_rows()
    twins = module.twin_rows(index, forget)
    assert torch.equal(twins.x_t, forget.x_t) and torch.equal(twins.t, forget.t)
    assert twins.teacher[0] is twins.student  # the teacher's own output for the twin prompt is the target
    for row, i in enumerate(index.tolist()):  # each row reads one of its own forget prompt's twins
        options = [module.embeds["twin"].text[j] for j in module.twin_table[i].tolist()]
        assert any(torch.equal(twins.student.text[row], option) for option in options), row
    assert module.losses()["twin"].item() == 0.0  # the student is the teacher
    assert "twin" not in built().losses()  # off by default
    assert "twin" not in built("neighbors.twins=true", "lambda_n=0").losses()  # the baselines' "no replay"


def test_the_base_model_answers_the_retain_rows_and_the_teacher_the_forgotten_ones(tiny_pipeline_dir, teacher_dir):

    def losses(*extra, student_from=None):
        request = Request("circle", "object", neighbors=["ring"])
        module, _ = build_module(teacher_dir, request, fast_cfg(*extra), ["dots"], base_dir=tiny_pipeline_dir)
        if student_from is not None:
            module.unet.load_state_dict(load_pipeline(student_from).unet.state_dict())
        module.setup("fit")
        module.on_fit_start()
        return {name: loss.item() for name, loss in module.losses().items() if name != "forget"}

    previous = losses()  # the student starts as the teacher: nothing to learn but the forgetting
    assert previous["retain"] == previous["neighbor"] == previous["unconditional"] == previous["forgotten"] == 0.0
    base = losses("replay.retain_teacher=base")  # the student starts as the teacher, not as the base model
    assert min(base["retain"], base["neighbor"], base["unconditional"]) > 1e-5
    assert base["forgotten"] < 1e-9  # the teacher's rows, batched apart from the student's: ~1e-14, not always 0
    # part-way (`replay.base_share`): the target moved a quarter of the way to M_0, so a sixteenth of the squared gap
    quarter = losses("replay.retain_teacher=base", "replay.base_share=0.25")
    for name in ("retain", "neighbor", "unconditional"):
        assert quarter[name] == pytest.approx(base[name] / 16, rel=1e-3), name
    assert quarter["forgotten"] < 1e-9
    for share in ("0", "1.5"):
        with pytest.raises(ValueError, match="base_share"):
            losses("replay.retain_teacher=base", f"replay.base_share={share}")
    with pytest.raises(ValueError, match="base_share applies where M_0 answers"):  # else silently nothing
        losses("replay.base_share=0.5")
    base = losses("replay.retain_teacher=base", student_from=tiny_pipeline_dir)  # a student that is the base model
    assert max(base["retain"], base["neighbor"], base["unconditional"]) < 1e-9  # batched apart: ~1e-13, not 0
    assert base["forgotten"] > 1e-5
    with pytest.raises(ValueError, match="retain_teacher"):
        losses("replay.retain_teacher=original")
    naive_cfg = fast_cfg("replay.retain_teacher=base", "lambda_r=0", "lambda_n=0")
    naive, _ = build_module(teacher_dir, Request("circle", "object"), naive_cfg, [], base_dir=tiny_pipeline_dir)
    assert naive.retain_teacher is naive.teacher and naive.references["base"] is naive.teacher.unet  # not even loaded


def test_the_base_referenced_anchor_holds_the_retained_tokens_at_the_base_model(tiny_pipeline_dir, teacher_dir):
    def anchor(*extra, student_from=None):
        request = Request("circle", "object", neighbors=["ring"])
        settings = ["trainable=cross_attention_kv", "regularizers.key_value_anchor.weight=1", *extra]
        module, _ = build_module(teacher_dir, request, fast_cfg(*settings), ["dots"], base_dir=tiny_pipeline_dir)
        if student_from is not None:
            module.unet.load_state_dict(load_pipeline(student_from).unet.state_dict())
        module.setup("fit")
        module.on_fit_start()
        return module, module.key_value_anchor().item()

    module, teacher_held = anchor()
    assert teacher_held == 0.0 and module.references["base"] is module.teacher.unet  # M_0 not even loaded
    module, base_held = anchor("regularizers.key_value_anchor.reference=base")
    assert base_held > 1e-4  # the student starts as the teacher, whose attn2 moved off M_0's
    (base, retained, _), (teacher, forgotten, weight) = module.anchor_parts()
    assert base is module.references["base"] is not module.teacher.unet and teacher is module.teacher.unet
    assert torch.equal(retained, torch.cat([module.embeds[g].text for g in ("retain", "neighbor")]))
    assert torch.equal(forgotten, module.embeds["forgotten"].text) and weight == 1.0
    # a student that is M_0: the retained tokens cost nothing, the forgotten ones (held at the teacher) do
    module, at_base = anchor("regularizers.key_value_anchor.reference=base", student_from=tiny_pipeline_dir)
    retained_only = KeyValueAnchor(module.unet, module.anchor_parts()[:1])
    assert at_base > 1e-4 and retained_only().item() < 1e-9
    # the retained pairs in more sentence forms are held with the retained prompts, at M_0
    module, _ = anchor("regularizers.key_value_anchor.reference=base",
                       "regularizers.key_value_anchor.templates=['{style} , {object}']")  # fmt: skip
    (_, retained, _), _ = module.anchor_parts()
    groups = ("retain", "neighbor", "anchored")
    assert torch.equal(retained, torch.cat([module.embeds[g].text for g in groups]))
    # the neighbours held at the teacher's (held_at_base names the groups M_0 holds)
    module, _ = anchor("regularizers.key_value_anchor.reference=base",
                       "regularizers.key_value_anchor.held_at_base=[retain]")  # fmt: skip
    (base, retained, _), (teacher, neighbors, _), (also_teacher, forgotten, weight) = module.anchor_parts()
    assert base is module.references["base"] and teacher is also_teacher is module.teacher.unet
    assert torch.equal(retained, module.embeds["retain"].text)
    assert torch.equal(neighbors, module.embeds["neighbor"].text)
    # the concepts forgotten before held harder against the others' pull, a part of their own
    module, _ = anchor("regularizers.key_value_anchor.reference=base",
                       "regularizers.key_value_anchor.forgotten_weight=3")  # fmt: skip
    (_, _, _), (teacher, forgotten, weight) = module.anchor_parts()
    assert teacher is module.teacher.unet and torch.equal(forgotten, module.embeds["forgotten"].text) and weight == 3.0
    with pytest.raises(ValueError, match="forgotten_weight must be > 0"):  # 0 with `protect: [forgotten]` holds nothing
        anchor("regularizers.key_value_anchor.forgotten_weight=0")
    with pytest.raises(ValueError, match=r"held_at_base names \['forgotten'\]: M_0 can hold only"):
        anchor("regularizers.key_value_anchor.reference=base", "regularizers.key_value_anchor.held_at_base=[forgotten]")
    with pytest.raises(ValueError, match=r"key_value_anchor.reference must be 'previous' or 'base'"):
        anchor("regularizers.key_value_anchor.reference=original")


def test_loss_guidance_compares_the_guided_predictions_of_every_loss(tiny_pipeline_dir, teacher_dir):
    def losses(*extra):
        request = Request("circle", "object", neighbors=["ring"])
        module, _ = build_module(teacher_dir, request, fast_cfg(*extra), ["dots"], base_dir=tiny_pipeline_dir)
        module.unet.load_state_dict(load_pipeline(tiny_pipeline_dir).unet.state_dict())  # student != teacher
        module.setup("fit")
        module.on_fit_start()
        return {name: loss.item() for name, loss in module.losses().items()}

    # each loss at guidance w is mean |d_u + w (d_c - d_u)|^2 (d: student - teacher) over its own rows: a
    # quadratic in w through the empty prompt's loss at those rows (w = 0) and the published loss (w = 1)
    every = "loss_guidance.losses=[forget,retain,neighbor,forgotten]"
    at = {w: losses(f"loss_guidance.scale={w}", every) for w in (0.0, 2.0, 3.0)}
    at[1.0] = losses()  # 1: the published losses, rows without the empty prompt
    for name in ("forget", "retain", "neighbor", "forgotten"):
        assert at[3.0][name] == pytest.approx(3 * at[2.0][name] - 3 * at[1.0][name] + at[0.0][name], rel=1e-3), name
        assert at[3.0][name] != pytest.approx(at[1.0][name], rel=1e-2), name
    # the empty prompt at the retain rows: the same loss, read from the retain rows' own empty-prompt half
    assert at[0.0]["retain"] == pytest.approx(at[0.0]["unconditional"], rel=1e-5)
    for w in (0.0, 2.0, 3.0):
        assert at[w]["unconditional"] == pytest.approx(at[1.0]["unconditional"], rel=1e-5)
    # only the losses listed (default: the retain replay); the others' rows and losses as published
    retain_only = losses("loss_guidance.scale=3.0")
    assert retain_only["retain"] == pytest.approx(at[3.0]["retain"], rel=1e-5)
    for name in ("forget", "neighbor", "forgotten", "unconditional"):
        assert retain_only[name] == pytest.approx(at[1.0][name], rel=1e-5), name
    assert "unconditional" not in losses("loss_guidance.scale=2.0", "retain.unconditional=false")
    for other in ("loss_scale=relative", "replay.retain_teacher=untouched", "loss_guidance.losses=[unconditional]"):
        with pytest.raises(ValueError, match="loss_guidance"):
            losses("loss_guidance.scale=2.0", other)


def test_untouched_has_the_base_model_answer_the_rows_no_earlier_request_touched(tiny_pipeline_dir, teacher_dir):
    heart = Request("heart", "object", neighbors=["square"], targets=["diamond"])  # an earlier request

    def built(student_from):
        cfg = fast_cfg("replay.retain_teacher=untouched", "batch=16", "replay.bank_size=16")
        request = Request("circle", "object", neighbors=["ring", "square"])
        module, _ = build_module(teacher_dir, request, cfg, [heart], base_dir=tiny_pipeline_dir)
        module.unet.load_state_dict(load_pipeline(student_from).unet.state_dict())
        module.setup("fit")
        module.on_fit_start()
        sample = module.replay.batch

        def drawn(group, size):  # the micro-batch draws retain and neighbour rows of both kinds
            index, z0 = sample(group, size)
            if group in ("retain", "neighbor"):
                assert module.touched[group][index].any() and not module.touched[group][index].all(), group
            return index, z0

        module.replay.batch = drawn
        return module

    module = built(teacher_dir)
    names_touched = re.compile(r"(?<!hollow )\bsquare\b|\bdiamond\b")  # `hollow square` is another concept
    for group in ("retain", "neighbor"):
        touched = [bool(names_touched.search(p)) for p in getattr(module.groups, group)]
        assert getattr(module.groups, f"{group}_touched") == touched and any(touched) and not all(touched), group
    base = module.retain_teacher
    assert base is not module.teacher
    assert module.taught_by == {"retain_untouched": base, "neighbor_untouched": base, "unconditional": base}
    losses = module.losses()  # the student is the teacher
    assert losses["forgotten"].item() == 0.0
    assert min(losses[name].item() for name in ("unconditional", "retain", "neighbor")) > 1e-5  # M_0's rows
    module = built(tiny_pipeline_dir)  # the student is M_0
    losses = module.losses()
    assert losses["unconditional"].item() < 1e-9
    assert min(losses["retain"].item(), losses["neighbor"].item()) > 1e-5  # the teacher's rows


def test_forgotten_replay_takes_retain_rows_so_every_request_trains_as_many_rows(tiny_pipeline_dir):
    def replay_rows(forgotten_before, *extra):
        module, _ = build_module(
            tiny_pipeline_dir,
            Request("circle", "object", neighbors=["ring"]),
            fast_cfg("batch=4", *extra),
            forgotten_before,
        )
        module.setup("fit")
        return module.replay_rows()

    assert replay_rows([]) == {"retain": 4, "neighbor": 4}
    assert replay_rows(["dots"]) == {"retain": 2, "neighbor": 4, "forgotten": 2}
    with pytest.raises(ValueError, match="forgotten_share"):
        replay_rows(["dots"], "replay.forgotten_share=0.9")


def trained_change(folder, teacher_dir) -> torch.Tensor:
    """A step's student UNet (in `folder`) less its teacher's, every parameter flattened into one vector."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir / "unet")
    return torch.cat([(a - b).flatten() for a, b in zip(unet.parameters(), teacher.parameters())])


def test_change_scale_keeps_that_share_of_the_trained_change(tiny_pipeline_dir, tmp_path):
    request = Request("dots", "style", prompts=["a ring in dots style", "dots style"])
    changes = {}
    for scale in (1.0, 0.5):
        cfg = fast_cfg("steps=2", f"change_scale={scale}")
        run_step(tiny_pipeline_dir, request, cfg, tmp_path / str(scale))
        changes[scale] = trained_change(tmp_path / str(scale), tiny_pipeline_dir)
    assert changes[1.0].abs().max() > 1e-6  # the same training both times; half its change kept
    torch.testing.assert_close(changes[0.5], 0.5 * changes[1.0], atol=1e-7, rtol=1e-4)
    with pytest.raises(ValueError, match="change_scale must be > 0"):
        run_step(tiny_pipeline_dir, request, fast_cfg("steps=2", "change_scale=0"), tmp_path / "none")


def test_the_cosine_schedule_falls_from_the_warm_up_to_near_zero_and_constant_stays_at_the_lr():
    warmup, steps = 4, 20
    constant = [lr_factor(k, warmup, steps, "constant") for k in range(steps)]
    cosine = [lr_factor(k, warmup, steps, "cosine") for k in range(steps)]
    assert constant == [0.25, 0.5, 0.75] + [1.0] * 17  # the linear warm-up, then the lr
    assert cosine[:4] == constant[:4]  # the same warm-up up to the full lr
    assert all(a > b for a, b in itertools.pairwise(cosine[3:]))  # then falling at every step
    assert cosine[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 16 / 17)))  # small, not 0: the last step counts
    assert cosine[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 17)))


def test_weight_average_makes_the_student_the_average_of_the_steps_and_resumes_it(tiny_pipeline_dir, tmp_path):
    request = Request("dots", "style", prompts=["a ring in dots style", "dots style"])
    last = {}  # the weights after 1, 2 and 4 steps, as change from the teacher (the average is passive)
    for steps in (1, 2, 4):
        run_step(tiny_pipeline_dir, request, fast_cfg(f"steps={steps}", "warmup=1"), tmp_path / f"last{steps}")
        last[steps] = trained_change(tmp_path / f"last{steps}", tiny_pipeline_dir)
    assert last[1].abs().max() > 1e-6 and not torch.equal(last[1], last[2])
    run_step(tiny_pipeline_dir, request, fast_cfg("steps=2", "warmup=1", "weight_average=0.9"), tmp_path / "avg2")
    # avg_2 = 0.9 (0.9 w_0 + 0.1 w_1) + 0.1 w_2, w_0 the teacher's
    torch.testing.assert_close(
        trained_change(tmp_path / "avg2", tiny_pipeline_dir), 0.09 * last[1] + 0.1 * last[2], atol=1e-7, rtol=1e-4
    )

    # killed after step 2 of 4: the average goes on from the checkpoint, as in an unbroken run
    cfg, checkpoints = fast_cfg("steps=4", "warmup=1", "weight_average=0.9", "checkpoint_every=2"), tmp_path / "ckpt"
    run_step(tiny_pipeline_dir, request, cfg, tmp_path / "whole")
    module, _ = build_module(tiny_pipeline_dir, request, cfg)
    make_trainer(cfg, checkpoint_dir=checkpoints).fit(module, train_dataloaders=step_indices(cfg))
    record = run_step(tiny_pipeline_dir, request, cfg, tmp_path / "resumed", checkpoint_dir=checkpoints)
    assert record["resumed_from"].endswith("last.ckpt")
    whole = trained_change(tmp_path / "whole", tiny_pipeline_dir)
    torch.testing.assert_close(trained_change(tmp_path / "resumed", tiny_pipeline_dir), whole, rtol=0, atol=0)
    assert not torch.allclose(whole, last[4])


@pytest.mark.parametrize(
    "setting, message",
    [
        ("lr_schedule=linear", "lr_schedule must be one of"),
        ("weight_average=1.0", r"weight_average must be in \[0, 1\)"),
        ("strategy=fsdp weight_average=0.9", "not with strategy=fsdp"),
    ],
)
def test_bad_lr_schedule_or_weight_average_is_refused_before_training(tiny_pipeline_dir, setting, message):
    with pytest.raises(ValueError, match=message):
        build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), fast_cfg(*setting.split()))


def test_training_seed_keeps_the_plan_and_draws_another_training(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    request = Request("dots", "style", prompts=["a ring in dots style", "dots style"])
    runs = {}
    for name, extra in {"seed": [], "again": [], "same": ["training_seed=0"], "other": ["training_seed=1"]}.items():
        cfg = fast_cfg("steps=2", "target.mode=score", "neighbors.mode=score", "seed=0", *extra)
        record = run_step(tiny_pipeline_dir, request, cfg, tmp_path / name)
        unet = UNet2DConditionModel.from_pretrained(tmp_path / name / "unet")
        plan = (record["targets"], record["neighbors"], record["prompt_counts"])
        runs[name] = (plan, torch.cat([p.flatten() for p in unet.parameters()]))
    assert runs["other"][0] == runs["seed"][0]  # the plan is seed's
    torch.testing.assert_close(runs["again"][1], runs["seed"][1], rtol=0, atol=0)  # a step is reproducible
    torch.testing.assert_close(runs["same"][1], runs["seed"][1], rtol=0, atol=0)  # training_seed = seed: the same
    assert not torch.equal(runs["other"][1], runs["seed"][1])  # another training draw


@pytest.mark.parametrize("replay_mode", ["bank", "per_step"])
def test_short_run_step_writes_a_stock_pipeline_folder(tiny_pipeline_dir, tmp_path, replay_mode):
    from diffusers import StableDiffusionPipeline

    cfg = fast_cfg("steps=2", "target.mode=score", "neighbors.mode=score", f"replay.mode={replay_mode}")
    out = tmp_path / "student"
    request = Request("dots", "style", prompts=["a ring in dots style", "dots style"])  # few prompts: fast scoring
    record = run_step(tiny_pipeline_dir, request, cfg, out, forgotten_before=["circle"])

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    teacher = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    assert not all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), teacher.unet.parameters()))
    assert json.loads((out / RECORD_FILE).read_text())["request"]["concept"] == "dots"
    assert record["steps"] == 2 and set(record["final_losses"]) >= {"forget", "retain", "neighbor", "forgotten", "reg"}
    assert len(record["neighbors"]["chosen"]) == cfg.neighbors.top_k
    assert set(record["targets"]["counts"]) <= set(concepts.STYLES) - {"dots"} - set(record["neighbors"]["chosen"])
    # per step: a batch each for forget and neighbour, one shared by retain and forgotten, and
    # the empty prompt on the retain rows (half a batch once the forgotten replay takes the rest)
    assert record["evaluations"]["student"] == 2 * (3 * cfg.batch + cfg.batch // 2)
    sampling = record["evaluations"]["teacher_sampling"]
    groups = 4  # forget, retain, neighbour, forgotten: a bank each
    if replay_mode == "bank":
        assert sampling == groups * cfg.replay.bank_size * cfg.sampling_steps
    else:
        assert sampling == 2 * 3 * cfg.batch * cfg.sampling_steps


def test_the_anchor_on_padding_holds_only_the_states_after_each_end_token(tiny_pipeline_dir):
    request = Request("circle", "object", neighbors=["ring"])
    settings = ["trainable=cross_attention_kv", "regularizers.key_value_anchor.weight=1"]
    module, _ = build_module(tiny_pipeline_dir, request, fast_cfg(*settings), ["dots"])
    module.setup("fit")
    every = module.anchored_states(["retain", "neighbor"], "all")
    padding = module.anchored_states(["retain", "neighbor"], "padding")
    prompts = module.groups.retain + module.groups.neighbor
    tokenizer = module.encoder.tokenizer
    lengths = [len(tokenizer(p).input_ids) for p in prompts]  # start, words, end
    assert padding.shape == (sum(every.shape[1] - n for n in lengths), every.shape[-1])
    assert torch.equal(padding[: every.shape[1] - lengths[0]], every[0, lengths[0]:])  # the first prompt's padding
    end_only = fast_cfg(*settings, "regularizers.key_value_anchor.tokens=end")
    with pytest.raises(ValueError, match=r"key_value_anchor\.tokens must be all or padding"):
        build_module(tiny_pipeline_dir, request, end_only, ["dots"])
