"""Baseline forget objectives and add-on regularisers: each is zero, non-zero or exact where it should be."""

import copy

import pytest
import torch
from torch import nn

from distill_forget.config import load_config
from distill_forget.distill.global_batch import GlobalBatch
from distill_forget.distill.networks import Denoiser, PromptEncoder
from distill_forget.distill.objectives import ESD, ConceptAblation, StartingPointPenalty
from distill_forget.distill.prompts import PromptGroups
from distill_forget.distill.regularizers import KeyValueAnchor, LowRankChange, ProtectedProjection, top_k_mask
from distill_forget.distill.step import build_module, make_trainer, plan_together, step_indices
from distill_forget.merging import merge_states, trim
from distill_forget.pipelines import load_pipeline
from distill_forget.requests import Request, mentions
from distill_forget.world.model import training_scheduler

FAST = ["steps=2", "batch=2", "replay.bank_size=2", "sampling_steps=2", "score.latents=2", "target.mode=fixed",
        "neighbors.mode=request", "accelerator=cpu"]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests are small: one thread avoids oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def networks(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    teacher = Denoiser(pipe.unet.requires_grad_(False).eval())
    return teacher, PromptEncoder(pipe.tokenizer, pipe.text_encoder)


# ---------------------------------------------------------------- forget objectives


def test_esd_and_ablation_are_zero_exactly_when_nothing_is_to_be_learned(networks):
    teacher, encoder = networks
    student_unet = copy.deepcopy(teacher.unet).requires_grad_(True)
    student = Denoiser(student_unet)
    torch.manual_seed(0)
    z0 = torch.randn(2, *teacher.latent_shape)
    concept, anchor, empty = (
        encoder(["a star in mosaic style"] * 2), encoder(["a square in mosaic style"] * 2), encoder([""] * 2)
    )

    def loss(objective, *embeds):
        return objective(student, teacher, z0, *embeds)

    esd, ablation = (
        ESD(training_scheduler(), 1.0, GlobalBatch(0)), ConceptAblation(training_scheduler(), GlobalBatch(0))
    )
    # ESD: the unconditional prompt has no concept to guide away from; ablation: a prompt onto itself.
    # (Zero up to rounding: the teacher's rows are batched with others, so its sums round differently.)
    assert loss(esd, empty, empty).item() == pytest.approx(0.0, abs=1e-10)
    assert loss(ablation, concept, concept).item() == pytest.approx(0.0, abs=1e-10)
    # a student that still draws the concept is pushed away from it / onto the anchor
    esd_loss, ablation_loss = loss(esd, concept, empty), loss(ablation, concept, anchor)
    assert esd_loss.item() > 1e-6 and ablation_loss.item() > 1e-6
    (esd_loss + ablation_loss).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_unet.parameters())
    assert all(p.grad is None for p in teacher.unet.parameters())


@pytest.mark.parametrize("objective, sampled", [("esd", "forget"), ("ablation", "mapped")])
def test_a_naive_method_trains_only_its_forget_objective_on_its_latents(tiny_pipeline_dir, objective, sampled, capsys):
    naive = ["lambda_r=0", "lambda_n=0", "lambda_forgotten=0", "lambda_reg=0"]
    cfg = load_config("step", [*FAST, f"forget_objective={objective}", *naive])
    module, plan = build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg, ["dots"])
    # ESD's negative guidance maps to no other prompt, so no target is chosen (and no distance computed for one)
    assert (plan["targets"]["mode"] == "none (esd)") == (objective == "esd")
    make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
    assert set(module.last_losses) == {"forget", "total"} and module.last_losses["forget"] > 0
    assert list(module.replay.latents) == [sampled]  # no teacher sampling for the unweighted replays
    assert f"1 groups ({sampled})" in capsys.readouterr().out


def test_unknown_forget_objective_is_named(tiny_pipeline_dir):
    with pytest.raises(
        ValueError, match=r"forget_objective must be one of \('distill', 'esd', 'ablation'\) \(got 'esd2'\)"
    ):
        build_module(
            tiny_pipeline_dir, Request("circle", "object"), load_config("step", [*FAST, "forget_objective=esd2"])
        )


# ---------------------------------------------------------------- L1-SP / L2-SP and selective fine-tuning


def test_starting_point_penalties_are_zero_at_the_reference_and_a_mean_over_trainable_elements():
    reference = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    student = copy.deepcopy(reference)
    student[1].requires_grad_(False)  # frozen: not counted
    assert StartingPointPenalty(1)(student, reference).item() == 0.0
    assert StartingPointPenalty(2)(student, reference).item() == 0.0
    with torch.no_grad():
        student[0].weight[0, 0] += 0.5  # one of 12 + 4 trainable elements
        student[1].weight.add_(9.0)  # frozen, ignored
    assert StartingPointPenalty(1)(student, reference).item() == pytest.approx(0.5 / 16)
    assert StartingPointPenalty(2)(student, reference).item() == pytest.approx(0.25 / 16)


def test_selective_mask_keeps_exactly_the_global_top_k():
    scores = {"a": torch.tensor([[5.0, 1.0], [3.0, 0.0]]), "b": torch.tensor([4.0, 2.0, 6.0])}
    masks = top_k_mask(scores, 3 / 7)
    assert masks["a"].tolist() == [[True, False], [False, False]]
    assert masks["b"].tolist() == [True, False, True]
    big = {"w": torch.rand(100, 10), "v": torch.rand(37)}
    assert sum(int(m.sum()) for m in top_k_mask(big, 0.05).values()) == round(0.05 * 1037)
    with pytest.raises(ValueError, match=r"selective.fraction"):
        top_k_mask(scores, 0.0)


def test_selective_fine_tuning_changes_only_the_masked_elements(tiny_pipeline_dir):
    cfg = load_config("step", [*FAST, "lr=1e-2", "warmup=1", "regularizers.selective.fraction=0.01",
                               "regularizers.selective.batches=1"])  # fmt: skip
    module, _ = build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg)
    make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
    teacher = dict(module.teacher.unet.named_parameters())
    changed = sum(int((p.detach() != teacher[n]).sum()) for n, p in module.unet.named_parameters())
    allowed = sum(int(m.sum()) for m in module.selective.masks.values())
    trainable = sum(p.numel() for p in module.unet.parameters() if p.requires_grad)
    assert allowed == round(0.01 * trainable) and 0 < changed <= allowed
    for name, p in module.unet.named_parameters():
        if name in module.selective.masks:
            assert torch.equal(p.detach()[~module.selective.masks[name]], teacher[name][~module.selective.masks[name]])


# ---------------------------------------------------------------- gradient projection


def relative_change(before: nn.Module, after: nn.Module, states: torch.Tensor) -> float:
    """The largest relative change of the keys / values `states` give, over every attn2.to_k / to_v."""
    worst = 0.0
    for (name, w0), (_, w1) in zip(before.named_parameters(), after.named_parameters()):
        if name.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")):
            k0, k1 = states @ w0.detach().T, states @ w1.detach().T
            worst = max(worst, float((k1 - k0).norm() / k0.norm()))
    return worst


def test_projected_updates_keep_the_keys_and_values_of_protected_embeddings(tiny_pipeline_dir):
    common = [*FAST, "steps=3", "lr=1e-2", "warmup=1", "trainable=cross_attention_kv", "forget_objective=ablation"]
    request = Request("circle", "object", neighbors=["ring"])
    results = {}
    for enabled in (True, False):
        cfg = load_config("step", [*common, f"regularizers.projection.enabled={enabled}"])
        module, _ = build_module(tiny_pipeline_dir, request, cfg, ["dots"])
        before = copy.deepcopy(module.unet)
        make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
        protected = torch.cat([module.embeds[g].text for g in ("retain", "neighbor", "forgotten")])
        results[enabled] = relative_change(before, module.unet, protected)
    assert results[True] < 1e-4, results
    assert results[False] > 1e-2, results  # the same training moves them without the projection


def test_projection_protects_only_the_groups_it_is_given(tiny_pipeline_dir):
    cfg = load_config("step", [*FAST, "steps=3", "lr=1e-2", "warmup=1", "trainable=cross_attention_kv",
                               "forget_objective=ablation", "regularizers.projection.enabled=true",
                               "regularizers.projection.protect=[neighbor]",
                               "regularizers.projection.dedup_cosine=null"])  # fmt: skip
    module, _ = build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg, ["dots"])
    before = copy.deepcopy(module.unet)
    make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
    assert relative_change(before, module.unet, module.embeds["neighbor"].text) < 1e-4
    assert relative_change(before, module.unet, module.embeds["retain"].text) > 1e-3  # no longer protected


def test_projection_refuses_an_unknown_group(tiny_pipeline_dir):
    cfg = load_config("step", [*FAST, "trainable=cross_attention_kv", "regularizers.projection.enabled=true",
                               "regularizers.projection.protect=[retained]"])  # fmt: skip
    with pytest.raises(ValueError, match=r"projection.protect must list groups among"):
        build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg, ["dots"])


def test_the_key_value_anchor_is_the_relative_change_of_the_protected_keys_and_value_paths():
    torch.manual_seed(0)
    net = nn.Module()
    net.block = nn.Module()
    net.block.attn2 = attn = nn.Module()
    attn.to_q = nn.Linear(5, 4, bias=False)
    attn.to_k, attn.to_v = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
    attn.to_out = nn.ModuleList([nn.Linear(4, 5)])
    reference = copy.deepcopy(net)
    protected = torch.randn(3, 2, 8)  # 6 token states in 8 dimensions
    anchor = KeyValueAnchor(net, [(reference, protected, 1.0)])
    assert float(anchor()) == 0.0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    states, ref = protected.reshape(6, 8), reference.block.attn2

    def relative_change(before, after):
        return float(((after - before) ** 2).sum() / (before**2).sum())

    def value_path(a):  # what each token hands the image once attended
        return a.to_out[0](a.to_v(states))

    expected = [relative_change(ref.to_k(states), attn.to_k(states))]
    expected.append(relative_change(value_path(ref), value_path(attn)))
    assert float(anchor()) == pytest.approx(sum(expected) / 2, rel=1e-4)
    anchor().backward()
    assert attn.to_q.weight.grad is None  # reads image features: not anchored
    free = torch.linalg.svd(torch.cat([states, torch.randn(1, 8)])).Vh[-1]  # orthogonal to every protected state
    assert float((attn.to_k.weight.grad @ free).abs().max()) < 1e-6  # a free direction costs nothing
    assert float((attn.to_v.weight.grad @ free).abs().max()) < 1e-6
    assert float(attn.to_out[0].bias.grad.abs().max()) > 0  # a shift of every prompt's output is counted


def test_the_key_value_anchor_holds_each_part_at_its_own_reference():
    torch.manual_seed(0)
    net = nn.Module()
    net.attn2 = attn = nn.Module()
    attn.to_k, attn.to_v = nn.Linear(8, 4), nn.Linear(8, 4)
    attn.to_out = nn.ModuleList([nn.Linear(4, 5)])
    first, student = copy.deepcopy(net), net
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    second = copy.deepcopy(student)
    held, free = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    # one reference for both parts is the one-part anchor over all their states
    together = KeyValueAnchor(student, [(first, torch.cat([held, free], 1), 1.0)])
    apart = KeyValueAnchor(student, [(first, held, 1.0), (first, free, 1.0)])
    assert float(apart()) == pytest.approx(float(together()))
    # a part counted twice is the part written twice
    twice = KeyValueAnchor(student, [(first, torch.cat([held, held, free], 1), 1.0)])
    assert float(KeyValueAnchor(student, [(first, held, 2.0), (first, free, 1.0)])()) == pytest.approx(float(twice()))
    # `free` is held at `second`, which the student still is: only `held`'s change counts, over both parts' sizes
    split = KeyValueAnchor(student, [(first, held, 1.0), (second, free, 1.0)])

    def maps(a, states):  # each token's key, and what it hands the image once attended
        return a.attn2.to_k(states), a.attn2.to_out[0](a.attn2.to_v(states))

    with torch.no_grad():
        expected = [
            float(((moved - ref) ** 2).sum() / ((ref**2).sum() + (other**2).sum()))
            for moved, ref, other in zip(maps(student, held[0]), maps(first, held[0]), maps(second, free[0]))
        ]
    assert float(split()) == pytest.approx(sum(expected) / 2, rel=1e-4)


def test_the_key_value_anchor_holds_the_protected_keys_and_values_closer(tiny_pipeline_dir):
    common = [*FAST, "steps=3", "lr=1e-2", "warmup=1", "trainable=cross_attention_kv", "forget_objective=ablation"]
    request = Request("circle", "object", neighbors=["ring"])
    moved, logged = {}, {}
    for weight in (0.0, 1.0e4):
        cfg = load_config("step", [*common, f"regularizers.key_value_anchor.weight={weight}"])
        module, _ = build_module(tiny_pipeline_dir, request, cfg, ["dots"])
        before = copy.deepcopy(module.unet)
        make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
        protected = torch.cat([module.embeds[g].text for g in ("retain", "neighbor", "forgotten")])
        moved[weight], logged[weight] = relative_change(before, module.unet, protected), module.last_losses
    assert moved[1.0e4] < 0.5 * moved[0.0], moved
    assert "key_value_anchor" in logged[1.0e4] and "key_value_anchor" not in logged[0.0]


def test_the_key_value_anchor_needs_trained_keys_or_values(tiny_pipeline_dir):
    cfg = load_config("step", [*FAST, "trainable=non_cross_attention", "regularizers.key_value_anchor.weight=1"])
    with pytest.raises(ValueError, match=r"key_value_anchor holds keys and values, but trainable='non_cross_"):
        build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg, ["dots"])


def test_projection_leaves_directions_outside_the_protected_span_free():
    net = nn.Module()
    net.block = nn.Module()
    net.block.attn2 = nn.Module()
    net.block.attn2.to_k = nn.Linear(8, 4, bias=False)
    reference = copy.deepcopy(net)
    torch.manual_seed(0)
    protected = torch.randn(3, 2, 8)  # 6 token embeddings in 8 dimensions
    projection = ProtectedProjection(net, protected, dedup_cosine=0.95)
    free = torch.linalg.svd(protected.reshape(6, 8)).Vh[-1]  # orthogonal to every protected embedding
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=1e-2)
    net.block.attn2.to_k.weight.grad = torch.randn(4, 8)
    projection.project_gradients(net)
    optimizer.step()
    projection.project_update(net, reference)
    delta = net.block.attn2.to_k.weight - reference.block.attn2.to_k.weight
    w0 = reference.block.attn2.to_k.weight
    for c in protected.reshape(6, 8):
        assert float((delta @ c).norm() / (w0 @ c).norm()) < 1e-4
    assert float((delta @ free).norm() / (w0 @ free).norm()) > 1e-2


# ---------------------------------------------------------------- settings and merging


def test_simultaneous_planning_forgets_every_concept_in_one_step():
    cfg = load_config("step", FAST)
    requests = [Request("dots", "style", neighbors=["big dots"]), Request("star", "object", neighbors=["heart"])]
    groups, record = plan_together(requests, cfg, distances=None, encoder=None)
    assert isinstance(groups, PromptGroups) and groups.forgotten == []
    names = lambda p, c: mentions(p.replace("big dots", "|"), c)  # noqa: E731  ("big dots" is kept)
    assert any(names(p, "dots") for p in groups.forget) and any(names(p, "star") for p in groups.forget)
    assert not any(names(p, "dots") or names(p, "star") for p in groups.mapped + groups.retain)
    assert set(record["neighbors"]["chosen"]) == {"heart"} and {"big dots", "heart"} <= set(record["replayed_concepts"])
    assert [t["concept"] for t in record["forgotten_together"]] == ["dots", "star"]


def test_merging_hand_made_task_vectors():
    base = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0]), "b": torch.tensor([1.0])}
    one = {"w": torch.tensor([1.0, -2.0, 0.5, 0.0]), "b": torch.tensor([1.0])}
    two = {"w": torch.tensor([3.0, 1.0, -0.5, 0.0]), "b": torch.tensor([2.0])}
    assert torch.equal(
        merge_states(base, [one, two], "task_arithmetic", scale=0.5)["w"], torch.tensor([2.0, -0.5, 0.0, 0.0])
    )
    uniform = merge_states(base, [one, two], "uniform")
    assert torch.equal(uniform["w"], torch.tensor([2.0, -0.5, 0.0, 0.0])) and torch.equal(
        uniform["b"], torch.tensor([1.5])
    )
    # trim: the top 40 % (2 of 5) entries by magnitude over all of the vector's tensors
    assert torch.equal(trim({"w": torch.tensor([1.0, -2.0, 0.5, 0.0]), "b": torch.tensor([0.0])}, 0.4)["w"],
                       torch.tensor([1.0, -2.0, 0.0, 0.0]))  # fmt: skip
    # TIES, everything kept: elected signs [+, -, 0 -> no entry, 0]; agreeing entries averaged
    ties = merge_states(base, [one, two], "ties", scale=1.0, top_k=1.0)
    assert torch.equal(ties["w"], torch.tensor([2.0, -2.0, 0.0, 0.0]))
    assert torch.equal(ties["b"], torch.tensor([2.0]))  # taus 0 and 1: a zero entry casts no vote
    with pytest.raises(ValueError, match=r"merge.method"):
        merge_states(base, [one], "average")


def test_ledger_chains_independent_requests_to_the_starting_model(tmp_path):
    from distill_forget.ledger import Ledger, LedgerError

    ledger = Ledger(tmp_path / "ledger.jsonl")
    fields = {"settings": {}, "started": "", "finished": "", "targets": {}, "neighbors": {}, "metrics": {}}
    ledger.append(
        {"index": 1, "request": {}, "setting": "independent", "input_hash": "base", "output_hash": "a", **fields}
    )
    ledger.append(
        {"index": 2, "request": {}, "setting": "independent", "input_hash": "base", "output_hash": "b", **fields}
    )
    assert len(ledger.verify()) == 2
    with pytest.raises(LedgerError, match="input_hash is not the starting model of record 1"):
        ledger.append(
            {"index": 3, "request": {}, "setting": "independent", "input_hash": "b", "output_hash": "c", **fields}
        )
        ledger.verify()


def start_token_change(before: nn.Module, after: nn.Module, start: torch.Tensor) -> float:
    """The largest relative change over every attn2 of the start token's key W_k s, of what it
    hands the image W_o W_v s, and of to_out's bias."""
    worst, modules = 0.0, dict(after.named_modules())
    for name, b in before.named_modules():
        if name.endswith("attn2"):
            a = modules[name]
            pairs = [
                (b.to_k.weight @ start, a.to_k.weight @ start),
                (b.to_out[0].weight @ b.to_v.weight @ start, a.to_out[0].weight @ a.to_v.weight @ start),
                (b.to_out[0].bias, a.to_out[0].bias),
            ]
            worst = max([worst] + [float((y - x).norm() / x.norm()) for x, y in pairs])
    return worst


def test_the_held_start_token_keeps_its_key_value_and_output(tiny_pipeline_dir):
    """The start token's state is the same in every prompt (a causal text encoder), so holding
    its key, value path and to_out's bias holds what every prompt reads there."""
    request = Request("circle", "object", neighbors=["ring"])
    results = {}
    for hold in (True, False):
        cfg = load_config("step", [*FAST, "steps=3", "lr=1e-2", "warmup=1", f"hold_start_token={hold}"])
        module, _ = build_module(tiny_pipeline_dir, request, cfg, ["dots"])
        before = copy.deepcopy(module.unet)
        make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
        states = torch.cat([module.embeds[g].text for g in ("forget", "retain", "unconditional")])
        start = states[0, 0]
        assert torch.allclose(states[:, 0], start.expand_as(states[:, 0]))
        with torch.no_grad():
            results[hold] = start_token_change(before, module.unet, start)
    assert results[True] < 1e-5, results
    assert results[False] > 1e-2, results  # the same training moves them without the hold


def test_a_low_rank_change_stays_within_its_rank(tiny_pipeline_dir):
    """With update_rank=r every trained matrix ends at most rank r from the teacher's; without, the same
    training changes them at higher rank."""
    request = Request("circle", "object", neighbors=["ring"])
    ranks = {}
    for rank in (1, 0):
        cfg = load_config("step", [*FAST, "steps=3", "lr=1e-2", "warmup=1", f"update_rank={rank}"])
        module, _ = build_module(tiny_pipeline_dir, request, cfg, ["dots"])
        before = dict(copy.deepcopy(module.unet).named_parameters())
        make_trainer(cfg).fit(module, train_dataloaders=step_indices(cfg))
        changes = [(p.detach() - before[n]).reshape(p.shape[0], -1) for n, p in module.unet.named_parameters()
                   if p.requires_grad and p.dim() >= 2]  # fmt: skip
        ranks[rank] = [int(torch.linalg.matrix_rank(c.double(), rtol=1e-4)) for c in changes]
    assert max(ranks[1]) == 1, ranks[1]
    assert max(ranks[0]) > 1, ranks[0]


def test_update_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="update_rank must be >= 1"):
        LowRankChange(nn.Linear(4, 4), nn.Linear(4, 4), 0)


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        (["update_rank=2", "regularizers.selective.fraction=0.2"], r"update_rank and regularizers\.selective cannot"),
        (["update_rank=2", "strategy=fsdp"], "update_rank decomposes whole matrices: not with strategy=fsdp"),
        (["update_rank=-1"], "update_rank must be >= 0"),
    ],
)
def test_a_low_rank_change_is_refused_where_it_cannot_hold(tiny_pipeline_dir, settings, refusal):
    cfg = load_config("step", [*FAST, *settings])
    with pytest.raises(ValueError, match=refusal):
        build_module(tiny_pipeline_dir, Request("circle", "object", neighbors=["ring"]), cfg, ["dots"])
