"""Prediction drift: a change common to every position reads as a spatial-mean share of 1."""

import copy

import pytest
import torch

from distill_forget.distill.networks import prompt_encoder
from distill_forget.pipelines import load_pipeline
from distill_forget.prediction_drift import main as prediction_drift_main
from distill_forget.prediction_drift import (
    prediction_drift,
    revert,
    spatial_mean_share,
    value_path_change,
    weight_change,
)
from distill_forget.step_probe import StepProbe

PROMPTS = ["a ring in neon style", "a square in dots style", "a star in sketch style"]


def test_a_bias_on_the_output_is_all_spatial_mean_and_a_cross_attention_change_is_not(tiny_pipeline_dir, tmp_path):
    pipe = load_pipeline(tiny_pipeline_dir)
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.1)  # every prediction, whatever the prompt, up by 0.1 everywhere
    pipe.save_pretrained(tmp_path / "bias")
    pipe = load_pipeline(tiny_pipeline_dir)
    with torch.no_grad():
        for name, weight in pipe.unet.named_parameters():
            if ".attn2.to_v." in name:
                weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    pipe.save_pretrained(tmp_path / "values")

    same = prediction_drift(StepProbe(tiny_pipeline_dir, tiny_pipeline_dir, 2, 6.0), PROMPTS, [100, 900])
    assert all(row[k]["mse"] == 0.0 for row in same for k in ("conditional", "empty", "guided"))

    for row in prediction_drift(StepProbe(tiny_pipeline_dir, tmp_path / "bias", 2, 6.0), PROMPTS, [100, 900]):
        for kind in ("conditional", "empty", "guided"):  # u + w (c - u) keeps the bias as it is
            assert row[kind]["mse"] == pytest.approx(0.01, rel=1e-3)
            assert row[kind]["mean_share"] == pytest.approx(1.0, abs=1e-4)
        assert row["guided"]["channel_means"] == pytest.approx([0.1] * 4, rel=1e-3)

    for row in prediction_drift(StepProbe(tiny_pipeline_dir, tmp_path / "values", 2, 6.0), PROMPTS, [100, 900]):
        assert row["conditional"]["mse"] > 0 and row["conditional"]["mean_share"] < 0.9


def test_spatial_mean_share_of_a_texture_and_a_cast():
    checker = ((torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1.0).expand(2, 3, 4, 4)
    assert spatial_mean_share(checker) == pytest.approx(0.0)
    assert spatial_mean_share(torch.full((2, 3, 4, 4), -0.5)) == pytest.approx(1.0)
    assert spatial_mean_share(checker + 1.0) == pytest.approx(0.5)
    assert spatial_mean_share(torch.zeros(2, 3, 4, 4)) == 0.0


def test_the_value_path_change_is_read_per_token_group(tiny_pipeline_dir, tmp_path):
    """Every layer's W_v scaled by 1.5 along the start token's text state (the same in every
    prompt): that token's value path changes by exactly half, every other token by less."""
    pipe = load_pipeline(tiny_pipeline_dir)
    start = prompt_encoder(pipe)(PROMPTS).text[0, 0]
    along_start = torch.outer(start, start) / start.dot(start)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_v.weight.add_(0.5 * module.to_v.weight @ along_start)
    pipe.save_pretrained(tmp_path / "start")

    teacher, student = load_pipeline(tiny_pipeline_dir), load_pipeline(tmp_path / "start")
    assert set(value_path_change(teacher, teacher, PROMPTS, "neon").values()) == {0.0}
    changed = value_path_change(teacher, student, PROMPTS, "neon")
    assert changed["start"] == pytest.approx(0.5, rel=1e-4)
    assert all(0 < changed[group] < 0.5 for group in ("words", "concept", "end", "padding"))
    assert value_path_change(teacher, student, PROMPTS[1:], "neon")["concept"] is None


def test_the_weight_change_is_read_over_the_changed_parameters_only():
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    student = copy.deepcopy(teacher)
    assert weight_change(teacher, student)["tensors"] == 0
    with torch.no_grad():
        student[1].weight.add_(torch.tensor([[0.3, 0.0, 0.0], [0.0, -0.4, 0.0]]))
    change = weight_change(teacher, student)
    assert change["tensors"] == 1 and change["elements"] == 6
    assert change["norm"] == pytest.approx(0.5) and change["mean_abs"] == pytest.approx(0.7 / 6)
    assert change["relative"] == pytest.approx(0.5 / float(teacher[1].weight.norm()))


def test_a_reverted_projection_takes_its_change_and_only_its_change_out(tiny_pipeline_dir, tmp_path):
    pipe = load_pipeline(tiny_pipeline_dir)
    with torch.no_grad():
        for name, weight in pipe.unet.named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_q." in name:
                weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    pipe.save_pretrained(tmp_path / "changed")
    probe = StepProbe(tiny_pipeline_dir, tmp_path / "changed", 2, 6.0)
    assert prediction_drift(probe, PROMPTS, [100])[0]["conditional"]["mse"] > 0
    assert revert(probe.student_pipe.unet, probe.teacher_pipe.unet, ["to_v"]) > 0
    still = dict(probe.student_pipe.unet.named_parameters())
    for name, weight in probe.teacher_pipe.unet.named_parameters():
        assert torch.equal(weight, still[name]) == (".attn2.to_q." not in name), name
    assert prediction_drift(probe, PROMPTS, [100])[0]["conditional"]["mse"] > 0  # to_q's change is left
    revert(probe.student_pipe.unet, probe.teacher_pipe.unet, ["to_q"])
    assert prediction_drift(probe, PROMPTS, [100])[0]["conditional"]["mse"] == 0.0
    with pytest.raises(ValueError, match=r"unknown projections \['to_x'\]"):
        revert(probe.student_pipe.unet, probe.teacher_pipe.unet, ["to_x"])


def test_a_template_without_both_slots_is_refused_before_any_model_is_read(tmp_path):
    with pytest.raises(SystemExit, match=r"--template 'a \{object\}': it must hold \{object\} and \{style\}"):
        prediction_drift_main(["--teacher", str(tmp_path), "--student", str(tmp_path), "--template", "a {object}"])
