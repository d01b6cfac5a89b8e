"""The evaluation command on a tiny random model: same images for the same seeds, a complete metrics.json."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from distill_forget.config import CONFIG_DIR
from distill_forget.evaluate import generate, grid_prompts, main
from distill_forget.pipelines import load_pipeline


def test_generation_depends_on_the_seed_not_on_batching(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    items = grid_prompts([0, 1])[:6]
    a = generate(pipe, items, steps=2, guidance_scale=2.0, batch=6)
    b = generate(pipe, items, steps=2, guidance_scale=2.0, batch=4)
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 32, 32)
    assert torch.equal(a, b)


def test_evaluate_command_writes_every_metric(tiny_pipeline_dir, tmp_path, capsys):
    from distill_forget.world.judge import MiniCanvasJudge

    judge_path = tmp_path / "judge.safetensors"
    torch.manual_seed(0)
    MiniCanvasJudge().eval().save(judge_path)
    out = tmp_path / "eval"
    main([f"model={tiny_pipeline_dir}", f"out={out}", f"judge={judge_path}", "seeds=[0]", "sampling_steps=2",
          "forget=[dots]", "replayed=[circle]"])  # fmt: skip
    result = json.loads((out / "metrics.json").read_text())
    for key in ("object_accuracy", "style_accuracy", "ua", "ira", "cra", "nra", "quality", "ira_unseen"):
        assert key in result["metrics"], key
    assert result["images"] == 144 and len(result["judged"]) == 144
    assert result["neighbors"] == ["big dots"]
    assert result["per_concept"]["dots"]["role"] == "forgotten"
    assert (out / "grid.png").is_file()
    printed = capsys.readouterr().out
    assert "results in" in printed
    dots = result["per_concept"]["dots"]
    assert sum(dots["read_as"].values()) == dots["images"] == 12  # every image of 'dots' read as some style
    reading, count = next(iter(dots["read_as"].items()))
    assert f"{reading} {count}" in next(line for line in printed.splitlines() if line.startswith("dots "))


def test_evaluate_defaults_live_in_one_config():
    cfg = OmegaConf.load(CONFIG_DIR / "evaluate.yaml")
    assert cfg.model is None and list(cfg.seeds)


def test_quality_leaves_out_the_images_of_forgotten_concepts():
    from distill_forget.evaluate import load_judge, retained_quality
    from distill_forget.world.render import grid_pairs, render_batch

    judge = load_judge(None)  # the shipped judge: features that tell the concepts apart
    cfg = OmegaConf.create({"reference_repeats": 1, "reference_seed": 11})
    prompts = [{"object": o, "style": s} for o, s in grid_pairs()]
    images = torch.from_numpy(render_batch(grid_pairs(), seed=3)).permute(0, 3, 1, 2).contiguous()
    broken = images.clone()
    dots = [i for i, p in enumerate(prompts) if p["style"] == "dots"]
    broken[dots] = 0  # what forgetting "dots" is allowed to do to its own images

    assert retained_quality(judge, broken, prompts, ["dots"], cfg) == retained_quality(
        judge, images, prompts, ["dots"], cfg
    )
    assert retained_quality(judge, broken, prompts, [], cfg) > retained_quality(judge, images, prompts, [], cfg)


def test_more_sentences_are_drawn_pooled_and_read_one_by_one(tiny_pipeline_dir, tmp_path, random_judge):
    """`templates`: the grid drawn in each sentence; the evaluation's sentence reads as it does alone."""
    from distill_forget.world.concepts import EVAL_TEMPLATE

    drawing = "a drawing of a {object} in {style} style"
    args = [f"model={tiny_pipeline_dir}", f"judge={random_judge}", "seeds=[0]", "sampling_steps=2", "forget=[dots]"]
    main([*args, f"out={tmp_path / 'one'}"])
    main([*args, f"out={tmp_path / 'two'}", f"templates=['{drawing}']"])
    alone, both = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))

    assert both["images"] == 288 and both["sentences"] == [EVAL_TEMPLATE, drawing]
    assert [sum(r.get("template") == drawing for r in both["judged"]), len(both["judged"])] == [144, 288]
    assert both["by_sentence"][EVAL_TEMPLATE] == alone["metrics"]  # the same images, quality included
    per_sentence = [both["by_sentence"][t]["object_accuracy"] for t in both["sentences"]]
    assert both["metrics"]["object_accuracy"] == pytest.approx(sum(per_sentence) / 2, abs=0.01)  # pooled
    assert "by_sentence" not in alone


def test_a_sentence_outside_the_world_is_refused_by_name(tiny_pipeline_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"evaluate\.templates.*photo"):
        main([f"model={tiny_pipeline_dir}", f"out={tmp_path}", "templates=['a photo of a {object} in {style} style']"])
