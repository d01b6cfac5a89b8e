"""The full-size architectures that the GPU figures are measured on, and the measurement itself."""

import json

import pytest
import torch

from distill_forget.config import CONFIG_DIR
from distill_forget.full_size import (
    CLIP_TOKENS,
    EXAMPLE_REQUESTS,
    FAMILIES,
    PUBLISHED_PARAMETERS,
    build_networks,
    measure,
    request_words,
)
from distill_forget.world.model import build_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_architectures_have_the_published_parameter_counts(family):
    tokenizer = build_tokenizer(["a"], max_tokens=CLIP_TOKENS)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        networks = build_networks(family, tokenizer)
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()}
    assert counts == PUBLISHED_PARAMETERS[family]


def test_tokenizer_knows_the_example_requests_and_pads_like_clip():
    tokenizer = build_tokenizer(
        request_words(CONFIG_DIR / "requests" / EXAMPLE_REQUESTS["sd15"]), max_tokens=CLIP_TOKENS
    )
    ids = tokenizer(["a vase of sunflowers in the style of Van Gogh", "Claude Monet"], padding="max_length").input_ids
    assert [len(row) for row in ids] == [CLIP_TOKENS, CLIP_TOKENS]
    assert tokenizer.unk_token_id not in ids[0] + ids[1]
    assert ids[0][ids[0].index(tokenizer.convert_tokens_to_ids("van")) + 1] == tokenizer.convert_tokens_to_ids("gogh")


def test_measure_runs_the_train_command_on_the_first_request_and_reports_its_costs(tiny_pipeline_dir, tmp_path):
    overrides = [
        "step.steps=2", "step.batch=2", "step.accumulate=1", "step.replay.bank_size=2", "step.sampling_steps=2",
        "step.score.latents=2", "step.accelerator=cpu", "step.precision=32-true", "step.strategy=auto", "threads=1",
    ]  # fmt: skip
    requests_file = CONFIG_DIR / "requests" / EXAMPLE_REQUESTS["sd15"]
    figures = measure(tiny_pipeline_dir, "models/sd15", requests_file, tmp_path / "run", overrides)

    ledger = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    assert [r["request"]["concept"] for r in ledger] == ["Van Gogh"]  # the first request only
    assert figures["optimizer_steps"] == 2 and figures["global_batch"] == 2 and figures["trainable"] == "full"
    seconds = figures["seconds"]
    assert 0 < seconds["training"] <= seconds["total"] <= figures["seconds_whole_request"]
    assert figures["seconds_per_optimizer_step"] == pytest.approx(seconds["training"] / 2, abs=1e-3)
    assert figures["evaluations"]["teacher_sampling"] > 0 and figures["peak_memory_mb"]["process_rss"] > 0
