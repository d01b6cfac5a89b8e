import pytest
import torch

from distill_forget.distill.networks import prompt_encoder
from distill_forget.distill.prompts import concept_prompt
from distill_forget.distill.targets import score_distance
from distill_forget.pipelines import load_pipeline
from distill_forget.probe_ranking import agreement, main, rankings
from distill_forget.world import concepts


def test_rankings_are_the_steps_score_distances_closest_first_and_fixed_by_the_seed(tiny_pipeline_dir):
    table = rankings(tiny_pipeline_dir, "dots", latents=[2, 4], seeds=2, forgotten=["mosaic"])
    assert list(table) == [2, 4] and all(len(ranked) == 2 for ranked in table.values())
    for ranked in table.values():
        for distance in ranked:
            assert set(distance) == set(concepts.STYLES) - {"dots", "mosaic"}
            assert list(distance.values()) == sorted(distance.values())
    assert table[4][0] == rankings(tiny_pipeline_dir, "dots", latents=[4], seeds=1, forgotten=["mosaic"])[4][0]
    assert table[4][0] != table[4][1]  # another probe seed, other latents, other distances

    pipe = load_pipeline(tiny_pipeline_dir)
    encoder = prompt_encoder(pipe)
    with torch.no_grad():
        both = encoder([concept_prompt("dots", "style"), concept_prompt("sketch", "style")])
        expected = score_distance(pipe.unet, both[0], both[1], num_latents=4, seed=1)
    assert table[4][1]["sketch"] == pytest.approx(float(expected), rel=1e-4)


def test_agreement_counts_the_seeds_that_protect_the_most_common_set():
    ranked = [
        {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0},
        {"b": 1.0, "a": 2.0, "c": 3.0, "d": 4.0},  # same two closest, other order
        {"a": 1.0, "c": 2.0, "b": 3.0, "d": 4.0},
    ]
    assert agreement(ranked, 2) == (frozenset({"a", "b"}), 2)
    assert agreement(ranked, 3) == (frozenset({"a", "b", "c"}), 3)


def test_the_command_prints_each_seeds_ranking_and_refuses_unknown_concepts(tiny_pipeline_dir, capsys):
    main(["--concept", "star", "--model", str(tiny_pipeline_dir), "--latents", "2", "--seeds", "2", "--top-k", "2",
          "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "K=2 probe latents" in out and "seed 1:" in out and "of 2 seeds protect" in out
    with pytest.raises(SystemExit, match="'unicorn' is not a MiniCanvas concept"):
        main(["--concept", "unicorn"])
    with pytest.raises(SystemExit, match="'stars' is not a MiniCanvas concept"):
        main(["--concept", "dots", "--forgotten", "stars"])
