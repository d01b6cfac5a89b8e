"""Quality by concept: putting back a concept's images from the base model finds the concept that carries a rise."""

import pytest
import torch

from distill_forget.evaluate import load_judge, real_renders, retained_pairs
from distill_forget.quality_by_concept import quality_by_concept
from distill_forget.world import concepts


def test_the_concept_whose_images_changed_tops_the_list_and_a_copy_moves_nothing():
    pairs = retained_pairs(concepts.OBJECTS[4:] + concepts.STYLES[4:], repeats=3)  # 4 x 4 pairs, 3 renders each
    prompts = [{"object": o, "style": s} for o, s in pairs]
    base, reference = real_renders(pairs, seed=3), real_renders(pairs, seed=11)
    judge = load_judge(None).eval()  # the shipped judge: a random one's features are all ~0

    same = quality_by_concept(base.clone(), base, prompts, reference, judge)
    assert same["model"] == pytest.approx(same["base"], rel=1e-5)
    assert {row["concept"] for row in same["concepts"]} == set(concepts.OBJECTS[:4] + concepts.STYLES[:4])
    assert same["colour_shift"] == [0.0, 0.0, 0.0] and same["without_cast"] == pytest.approx(same["base"], rel=1e-5)
    for row in same["concepts"]:
        assert row["images"] == 12 and row["pixel_change"] == 0.0 and row["colour_shift"] == [0.0, 0.0, 0.0]
        assert row["drop"] == pytest.approx(0.0, abs=1e-2)

    changed = concepts.STYLES[1]
    model = base.clone()
    mine = torch.tensor([p["style"] == changed for p in prompts])
    model[mine] = torch.randint(
        0, 256, model[mine].shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    result = quality_by_concept(model, base, prompts, reference, judge)
    assert result["model"] > result["base"] + 1.0
    top = result["concepts"][0]
    assert top["concept"] == changed
    assert top["drop"] == pytest.approx(result["model"] - result["base"], rel=1e-4)  # all of the rise: base again
    assert top["pixel_change"] > 50
    for name in ("model", "base"):  # the two terms add up to the figure (torchmetrics' Frechet distance)
        terms = result["terms"][name]
        assert terms["mean"] + terms["spread"] == pytest.approx(result[name], rel=1e-3)
    untouched_style = next(row for row in result["concepts"] if row["concept"] == concepts.STYLES[2])
    assert untouched_style["pixel_change"] == 0.0 and abs(untouched_style["drop"]) < 0.5 * top["drop"]


def test_a_colour_cast_of_every_image_shows_as_the_same_shift_in_every_row_and_taking_it_out_undoes_its_rise():
    pairs = retained_pairs(concepts.OBJECTS[4:] + concepts.STYLES[4:], repeats=1)
    prompts = [{"object": o, "style": s} for o, s in pairs]
    base, reference = real_renders(pairs, seed=3), real_renders(pairs, seed=11)
    model = base.clone()
    model[:, 0] = (base[:, 0].int() - 40).clamp(0, 255).to(torch.uint8)  # red down by 40 where it can go
    expected = (model[:, 0].float() - base[:, 0].float()).mean().item()
    result = quality_by_concept(model, base, prompts, reference, load_judge(None).eval())
    assert expected < -20
    assert result["colour_shift"] == pytest.approx([expected, 0.0, 0.0], abs=0.01)
    for row in result["concepts"]:
        assert row["colour_shift"][0] < -15 and row["colour_shift"][1:] == [0.0, 0.0]
    rise, left = result["model"] - result["base"], result["without_cast"] - result["base"]
    assert rise > 1.0 and abs(left) < 0.5 * rise  # most of the rise was the cast


def test_images_that_became_alike_show_in_the_spread_term_and_images_that_moved_alike_in_the_mean_term():
    from distill_forget.quality_by_concept import frechet_terms
    from distill_forget.world.judge import JudgeFeatures

    pairs = retained_pairs(concepts.OBJECTS[4:] + concepts.STYLES[4:], repeats=3)
    base, reference = real_renders(pairs, seed=3), real_renders(pairs, seed=11)
    features = JudgeFeatures(load_judge(None).eval())
    renders = features(reference)
    before = frechet_terms(features(base), renders)
    alike = frechet_terms(features(base[:1].expand_as(base).clone()), renders)  # one image, over and over
    assert before["trace"] > 0 and alike["trace"] == pytest.approx(0.0, abs=1e-6)
    assert alike["spread"] == pytest.approx(alike["reference_trace"], rel=1e-4)  # Tr(0 + S_ref - 0)
    assert alike["spread"] > before["spread"]
    darker = frechet_terms(features((base.int() // 2).to(torch.uint8)), renders)  # every image moved the same way
    assert darker["mean"] > before["mean"]


def test_blurred_images_are_less_sharp_and_a_copy_is_as_sharp():
    from distill_forget.quality_by_concept import detail

    images = real_renders(retained_pairs(concepts.OBJECTS[4:] + concepts.STYLES[4:], repeats=1), seed=3)
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, stride=1, padding=1, count_include_pad=False)
    sharp, soft = detail(images), detail(blurred.round().to(torch.uint8))
    assert detail(images.clone()) == sharp and sharp["sharpness"] > 10
    assert soft["sharpness"] < 0.7 * sharp["sharpness"] and soft["contrast"] < sharp["contrast"]
    flat = detail(torch.full_like(images, 128))
    assert flat == {"sharpness": 0.0, "contrast": 0.0}


def test_base_images_that_are_not_the_evaluation_grid_are_refused_before_any_drawing(tmp_path, tiny_pipeline_dir):
    from distill_forget.config import load_config
    from distill_forget.evaluate import grid_prompts
    from distill_forget.quality_by_concept import main

    grid = len(grid_prompts(load_config("evaluate", []).seeds))
    kept = tmp_path / "images.pt"
    torch.save(torch.zeros((5, 3, 8, 8), dtype=torch.uint8), kept)
    with pytest.raises(SystemExit, match=f"holds 5 images, not the {grid} of the evaluation grid"):
        main(["--model", str(tiny_pipeline_dir), "--base-images", str(kept)])
    with pytest.raises(SystemExit, match="leave out --seeds and --base-cache"):  # that grid has the evaluation's seeds
        main(["--model", str(tiny_pipeline_dir), "--base-images", str(kept), "--seeds", "12"])
    for count in ("4", "0"):  # 0 is refused, not read as the default
        with pytest.raises(SystemExit, match="a multiple of the evaluation's"):
            main(["--model", str(tiny_pipeline_dir), "--seeds", count])


def test_over_more_seeds_it_takes_apart_the_figure_quality_noise_gives_for_all_of_them(tiny_pipeline_dir):
    from distill_forget.config import load_config
    from distill_forget.evaluate import generate, grid_prompts, retained_rows
    from distill_forget.pipelines import load_pipeline
    from distill_forget.quality_noise import group_renders, rise_by_sample_size, study_seeds

    cfg = load_config("evaluate", ["sampling_steps=2", "reference_repeats=1", "batch=32", "seeds=[0]"])
    forgotten = concepts.OBJECTS[4:] + concepts.STYLES[4:]  # 4 x 4 pairs left
    seeds = study_seeds(cfg.seeds, 2)
    items = grid_prompts(seeds)
    prompts = [items[i] for i in retained_rows(items, forgotten)]
    base = generate(load_pipeline(tiny_pipeline_dir), prompts, cfg.sampling_steps, cfg.guidance_scale, cfg.batch)
    model = base.clone()
    model[len(prompts) // 2 :] = 255 - model[len(prompts) // 2 :]  # seed 1's images inverted
    judge = load_judge(None).eval()

    all_seeds = rise_by_sample_size(model, base, prompts, forgotten, seeds, 1, judge, cfg)[-1]
    result = quality_by_concept(model, base, prompts, group_renders(forgotten, len(seeds), 1, cfg), judge)

    assert all_seeds["seeds"] == seeds
    assert result["model"] == pytest.approx(all_seeds["model"], rel=1e-6)
    assert result["base"] == pytest.approx(all_seeds["base"], rel=1e-6)
    assert result["model"] > result["base"]


def test_a_runs_base_images_drawn_with_other_evaluation_settings_are_refused(tmp_path, tiny_pipeline_dir):
    from omegaconf import OmegaConf

    from distill_forget.config import load_config
    from distill_forget.evaluate import grid_prompts
    from distill_forget.quality_by_concept import main, refuse_other_sampling

    cfg = load_config("evaluate", [])
    kept = tmp_path / "run" / "base" / "images.pt"
    kept.parent.mkdir(parents=True)
    torch.save(torch.zeros((len(grid_prompts(cfg.seeds)), 3, 8, 8), dtype=torch.uint8), kept)
    config = tmp_path / "run" / "config.yaml"
    OmegaConf.save({"evaluate": OmegaConf.merge(cfg, {"guidance_scale": cfg.guidance_scale + 1.0})}, config)
    with pytest.raises(SystemExit, match=rf"guidance_scale {cfg.guidance_scale + 1.0} \(here {cfg.guidance_scale}\)"):
        main(["--model", str(tiny_pipeline_dir), "--base-images", str(kept)])
    OmegaConf.save({"evaluate": OmegaConf.merge(cfg, {"seeds": [5, 6, 7], "sampling_steps": 4})}, config)
    with pytest.raises(SystemExit, match=r"seeds \[5, 6, 7\] .*sampling_steps 4"):
        main(["--model", str(tiny_pipeline_dir), "--base-images", str(kept)])
    more = "a drawing of a {object} in {style} style"  # a run that drew its grid in one more sentence
    OmegaConf.save({"evaluate": OmegaConf.merge(cfg, {"templates": [more]})}, config)
    torch.save(torch.zeros((2 * len(grid_prompts(cfg.seeds)), 3, 8, 8), dtype=torch.uint8), kept)
    with pytest.raises(SystemExit, match=r"other evaluation settings .*templates \['a drawing of"):
        main(["--model", str(tiny_pipeline_dir), "--base-images", str(kept)])
    config.write_text("evaluate: [unclosed")
    with pytest.raises(SystemExit, match="cannot be read as a run's config"):
        refuse_other_sampling(kept, cfg)
    OmegaConf.save({"evaluate": cfg}, config)
    refuse_other_sampling(kept, cfg)  # the run's own settings: taken
