"""The quality figure by sample size: its first group is the loop's figure, a model against
itself rises by nothing, and other seeds move the figure."""

import pytest
import torch

from distill_forget.config import load_config
from distill_forget.evaluate import evaluate_pipeline, generate, grid_prompts, load_judge, retained_rows
from distill_forget.pipelines import load_pipeline
from distill_forget.quality_noise import (
    base_images,
    forgotten_of,
    group_sizes,
    main,
    rise_by_sample_size,
    study_seeds,
)
from distill_forget.world import concepts


def test_seed_groups_start_with_the_evaluation_seeds_and_double():
    assert study_seeds([0, 1, 2], 12) == list(range(12))
    assert study_seeds([5], 3) == [5, 6, 7]
    assert group_sizes(3, 12) == [3, 6, 12]
    assert group_sizes(3, 9) == [3, 9]
    assert group_sizes(2, 2) == [2]
    with pytest.raises(ValueError, match="multiple of the evaluation's 3 seeds"):
        study_seeds([0, 1, 2], 10)


def test_a_folder_that_is_no_step_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="is not a step folder of a run"):
        forgotten_of(tmp_path)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "metrics.json").write_text('{"forgotten": ["dots", "star"]}')
    assert forgotten_of(tmp_path) == ["dots", "star"]
    with pytest.raises(SystemExit, match=r"--template: 'a \{object\}' must hold"):
        main([str(tmp_path), "--template", "a {object}"])


def test_first_group_is_the_loops_figure_and_a_model_against_itself_rises_by_nothing(tiny_pipeline_dir):
    cfg = load_config("evaluate", ["sampling_steps=2", "reference_repeats=1", "batch=32", "seeds=[0]"])
    forgotten = concepts.OBJECTS[4:] + concepts.STYLES[4:]  # 4 x 4 pairs left
    judge = load_judge(None).eval()  # the shipped judge: a random one's features are all ~0
    pipe = load_pipeline(tiny_pipeline_dir)
    seeds = study_seeds(cfg.seeds, 2)
    items = grid_prompts(seeds)
    prompts = [items[i] for i in retained_rows(items, forgotten)]
    images = generate(pipe, prompts, cfg.sampling_steps, cfg.guidance_scale, cfg.batch)

    rows = rise_by_sample_size(images, images, prompts, forgotten, seeds, 1, judge, cfg)

    assert [(row["size"], row["seeds"], row["images"]) for row in rows] == [(1, [0], 16), (1, [1], 16), (2, [0, 1], 32)]
    loop_figure = evaluate_pipeline(pipe, judge, cfg, forgotten)[0]["metrics"]["quality"]
    assert rows[0]["model"] == pytest.approx(loop_figure, rel=1e-3)
    assert all(row["rise"] == pytest.approx(0.0, abs=1e-6) for row in rows)
    assert rows[1]["base"] != pytest.approx(rows[0]["base"], rel=1e-3)  # another seed, another figure

    moved = images.clone()
    moved[len(prompts) // 2 :] = 255 - moved[len(prompts) // 2 :]  # seed 1's images inverted
    rows = rise_by_sample_size(moved, images, prompts, forgotten, seeds, 1, judge, cfg)
    assert rows[0]["rise"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["rise"] > 5 and rows[2]["rise"] > 5


def test_the_base_images_are_kept_and_drawn_again_only_where_they_would_differ(tiny_pipeline_dir, tmp_path, capsys):
    cfg = load_config("evaluate", ["sampling_steps=2", "batch=2"])
    items = grid_prompts([0])[:2]
    cache = tmp_path / "base.pt"
    drawn = base_images(tiny_pipeline_dir, items, cfg, cache)
    assert "generating" in capsys.readouterr().out and cache.is_file()
    assert torch.equal(base_images(tiny_pipeline_dir, items, cfg, cache), drawn)
    assert "read from" in capsys.readouterr().out
    other_seed = [{**item, "seed": 1} for item in items]
    assert not torch.equal(base_images(tiny_pipeline_dir, other_seed, cfg, cache), drawn)
    assert "drawing them again" in capsys.readouterr().out
    fewer_steps = load_config("evaluate", ["sampling_steps=1", "batch=2"])
    base_images(tiny_pipeline_dir, other_seed, fewer_steps, cache)
    assert "drawing them again" in capsys.readouterr().out
    cache.write_bytes(b"not a torch file")  # a damaged file is drawn again, not an error
    assert torch.equal(base_images(tiny_pipeline_dir, items, cfg, cache), drawn)
    assert "unreadable" in capsys.readouterr().out
    # another sentence for the same pairs draws other images, and is kept apart from the evaluation's
    other_sentence = [{**item, "template": "a drawing of a {object} in {style} style"} for item in items]
    assert not torch.equal(base_images(tiny_pipeline_dir, other_sentence, cfg, cache), drawn)
    assert "drawing them again" in capsys.readouterr().out
    evaluation_sentence = [{**item, "template": concepts.EVAL_TEMPLATE} for item in items]
    assert torch.equal(generate(load_pipeline(tiny_pipeline_dir), evaluation_sentence, 2, cfg.guidance_scale, 2), drawn)
