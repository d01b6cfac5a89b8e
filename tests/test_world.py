import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from distill_forget.world import concepts
from distill_forget.world.model import MAX_TOKENS, build_tokenizer
from distill_forget.world.render import grid_pairs, render, render_batch


def test_rendering_is_deterministic_under_a_seed():
    pairs = grid_pairs()
    a, b = render_batch(pairs, seed=5), render_batch(pairs, seed=5)
    assert a.dtype == np.uint8 and a.shape == (144, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_batch(pairs, seed=6))


def test_every_render_differs_from_its_style_and_object_neighbours():
    rng = lambda: np.random.default_rng(0)  # noqa: E731 - same jitter for both
    for group in concepts.NEIGHBOR_GROUPS:
        for x, y in itertools.pairwise(group):
            if x in concepts.OBJECTS:
                assert not np.array_equal(render(x, "flat color", rng()), render(y, "flat color", rng()))
            else:
                assert not np.array_equal(render("circle", x, rng()), render("circle", y, rng()))


def test_unknown_concepts_are_named_in_the_error():
    with pytest.raises(KeyError, match="unicorn"):
        render("unicorn", "dots", np.random.default_rng(0))
    with pytest.raises(KeyError, match="unicorn"):
        concepts.kind_of("unicorn")


def test_world_size_and_neighbour_groups():
    assert len(concepts.OBJECTS) >= 12 and len(concepts.STYLES) >= 12
    assert len(concepts.NEIGHBOR_GROUPS) >= 3
    for group in concepts.NEIGHBOR_GROUPS:
        assert 2 <= len(group) <= 3
        assert len({concepts.kind_of(c) for c in group}) == 1, group
    assert concepts.neighbors_of("stripes") == ["thin stripes", "diagonal stripes"]
    assert concepts.neighbors_of("star") == []


def test_tokenizer_round_trips_the_world_vocabulary():
    tok = build_tokenizer()
    for template in concepts.FULL_TEMPLATES + concepts.OBJECT_TEMPLATES + concepts.STYLE_TEMPLATES:
        for obj, style in grid_pairs():
            prompt = template.format(object=obj, style=style)
            ids = tok(prompt, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids
            assert len(ids) == MAX_TOKENS
            assert tok.unk_token_id not in ids, prompt
            assert tok.decode(ids, skip_special_tokens=True).split() == prompt.split()
    assert tok.unk_token_id in tok("a unicorn").input_ids


def test_listing_command_prints_the_concepts():
    out = subprocess.run(
        [sys.executable, "-m", "distill_forget.world", "--list"], capture_output=True, text=True, check=True
    )
    listing = json.loads(out.stdout)
    assert listing["objects"] == concepts.OBJECTS
    assert listing["styles"] == concepts.STYLES
    assert listing["neighbor_groups"] == concepts.NEIGHBOR_GROUPS


def test_edit_residual_is_zero_for_a_concept_apart_and_large_for_a_duplicate():
    import torch

    from distill_forget.world.text_geometry import edit_residual

    basis = torch.eye(6, dtype=torch.float64)
    kept = {"b": basis[[0, 1]], "c": basis[[2]]}
    apart = {"a": basis[[4, 5]], **kept, "t": basis[[3, 3]]}  # a lies outside every kept direction
    assert edit_residual(apart, "a", "t") < 1e-9
    duplicate = {"a": basis[[0, 1]], **kept, "t": basis[[3, 4]]}  # a's states are b's
    assert edit_residual(duplicate, "a", "t") > 0.4


def test_shipped_text_encoder_lets_every_concept_be_edited_alone():
    # The forget mapping trains cross-attention, linear in the text states: a concept whose
    # states the others span cannot be moved alone (the old 64-wide trained encoder: 0.52 for objects).
    from distill_forget.config import MINICANVAS_DIR
    from distill_forget.pipelines import load_pipeline
    from distill_forget.world.text_geometry import mean_edit_residuals

    pipe = load_pipeline(MINICANVAS_DIR / "pipeline")
    for domain in ("object", "style"):
        residuals = mean_edit_residuals(pipe.tokenizer, pipe.text_encoder, domain)
        assert max(residuals.values()) < 0.3, (domain, residuals)
