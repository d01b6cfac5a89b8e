"""The quality-noise check: the same model under the same seeds is at distance ~0, other seeds are not."""

import pytest

from distill_forget.config import load_config
from distill_forget.evaluate import load_judge
from distill_forget.quality_noise import quality_noise
from distill_forget.world import concepts


def test_same_model_same_seeds_is_at_zero_and_other_seeds_move_the_figure(tiny_pipeline_dir):
    cfg = load_config("evaluate", ["sampling_steps=2", "reference_repeats=1", "batch=32"])
    forgotten = concepts.OBJECTS[4:] + concepts.STYLES[4:]  # 4 x 4 pairs left
    judge = load_judge(None).eval()  # the shipped judge: a random one's features are all ~0
    result = quality_noise(tiny_pipeline_dir, tiny_pipeline_dir, forgotten, [0], [1], cfg, judge)
    assert result["images per side"] == 16
    assert result["model, evaluation seeds"] == pytest.approx(result["base, evaluation seeds"], rel=1e-4)
    assert result["model, other seeds"] == pytest.approx(result["base, other seeds"], rel=1e-4)
    assert result["model vs base, evaluation seeds"] == pytest.approx(0.0, abs=1e-2)
    assert result["base vs base, the two seed sets"] > 1e-2
    assert result["base, other seeds"] != pytest.approx(result["base, evaluation seeds"], rel=1e-4)
