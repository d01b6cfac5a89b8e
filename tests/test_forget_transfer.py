"""The forget-transfer check: a student that is the teacher has all of the way left, a changed one does not."""

import pytest

from distill_forget.forget_transfer import sentence_forms, share_left
from distill_forget.world import concepts


def test_sentence_forms_pair_the_concept_with_every_concept_of_the_other_kind():
    forms = sentence_forms("dots")
    assert forms["evaluation"][0] == concepts.eval_prompt(concepts.OBJECTS[0], "dots")
    assert len(forms) == 1 + len(concepts.PARAPHRASE_TEMPLATES)
    assert all(len(p) == len(concepts.OBJECTS) and all("dots" in s for s in p) for p in forms.values())


def test_the_teacher_itself_has_all_of_the_way_left_and_a_changed_student_not(tiny_pipeline_dir, teacher_dir):
    same = share_left(tiny_pipeline_dir, tiny_pipeline_dir, "star", "arrow", [300, 700], sampling_steps=2)
    assert set(same) == set(sentence_forms("star"))
    assert all(v == pytest.approx(1.0, abs=1e-5) for row in same.values() for v in row)

    # perturbed attn2
    changed = share_left(tiny_pipeline_dir, teacher_dir, "star", "arrow", [300, 700], sampling_steps=2)
    assert all(abs(v - 1.0) > 1e-3 for row in changed.values() for v in row)
