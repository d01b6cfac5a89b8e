"""The ledger accepts honest runs and names the record or folder that was tampered with."""

import json
import subprocess
import sys

import pytest

from distill_forget.ledger import GENESIS, LEDGER_NAME, Ledger, LedgerError, checkpoint_folder, step_dir, weights_hash

CONCEPTS = [("dots", "style"), ("circle", "object"), ("big dots", "style")]


def fake_pipeline(folder, content: bytes):
    """A pipeline-shaped folder with safetensors files (bytes need not be real tensors)."""
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet:" + content)
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"text:" + content)
    (folder / "model_index.json").write_text("{}")
    return folder


def make_record(index, concept, kind, input_hash, output_hash, **extra):
    return {
        "index": index,
        "request": {"concept": concept, "kind": kind, "prompts": [], "targets": [], "neighbors": []},
        "settings": {"steps": 300, "lambda_f": 6.0},
        "started": "2025-01-01T00:00:00+00:00",
        "finished": "2025-01-01T00:05:00+00:00",
        "targets": ["stripes"],
        "neighbors": ["big dots"],
        "metrics": {"ua": 95.0, "ira": 80.5, "cra": 90.0, "nra": None, "quality": 3.2},
        "input_hash": input_hash,
        "output_hash": output_hash,
        **extra,
    }


@pytest.fixture
def run_dir(tmp_path):
    """A run folder of three honest requests, each with its step's pipeline folder."""
    run = tmp_path / "run"
    ledger = Ledger(run / LEDGER_NAME)
    previous = weights_hash(fake_pipeline(tmp_path / "base", b"base"))
    for index, (concept, kind) in enumerate(CONCEPTS, start=1):
        output = weights_hash(fake_pipeline(step_dir(run, index, concept) / "pipeline", concept.encode()))
        ledger.append(make_record(index, concept, kind, previous, output))
        previous = output
    return run


def lines_of(run):
    return (run / LEDGER_NAME).read_text().splitlines()


def write_lines(run, lines):
    (run / LEDGER_NAME).write_text("".join(line + "\n" for line in lines))


def test_an_honest_chain_verifies(run_dir):
    records = Ledger(run_dir / LEDGER_NAME).verify()
    assert [r["index"] for r in records] == [1, 2, 3]
    assert records[0]["prev_hash"] == GENESIS
    assert [r["prev_hash"] for r in records[1:]] == [r["record_hash"] for r in records[:-1]]
    assert records[1]["request"]["concept"] == "circle"


def test_appending_never_rewrites_earlier_lines(run_dir, tmp_path):
    before = (run_dir / LEDGER_NAME).read_bytes()
    ledger = Ledger(run_dir / LEDGER_NAME)
    last = ledger.records()[-1]["output_hash"]
    ledger.append(make_record(4, "neon", "style", last, "f" * 64))
    assert (run_dir / LEDGER_NAME).read_bytes().startswith(before)
    assert len(ledger.verify()) == 4


def test_append_refuses_a_wrong_index_and_missing_fields(run_dir):
    ledger = Ledger(run_dir / LEDGER_NAME)
    last = ledger.records()[-1]["output_hash"]
    with pytest.raises(ValueError, match="the next request is 4"):
        ledger.append(make_record(7, "neon", "style", last, "f" * 64))
    record = make_record(4, "neon", "style", last, "f" * 64)
    del record["output_hash"]
    with pytest.raises(ValueError, match="output_hash"):
        ledger.append(record)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["metrics"].update(ua=100.0),
        lambda r: r["request"].update(concept="stripes"),
        lambda r: r.update(finished="2030-01-01T00:00:00+00:00"),
        lambda r: r.update(output_hash="0" * 64),
    ],
    ids=["metric", "concept", "time", "output_hash"],
)
def test_editing_an_earlier_record_is_detected_and_named(run_dir, edit):
    lines = lines_of(run_dir)
    record = json.loads(lines[1])
    edit(record)
    lines[1] = json.dumps(record)
    write_lines(run_dir, lines)
    with pytest.raises(LedgerError, match=r"record 2 \(line 2\): record_hash does not match"):
        Ledger(run_dir / LEDGER_NAME).verify()


def test_an_edit_with_a_recomputed_hash_breaks_the_chain_at_the_next_record(run_dir):
    from distill_forget.ledger import record_hash

    lines = lines_of(run_dir)
    record = json.loads(lines[0])
    record["metrics"]["ua"] = 100.0
    record["record_hash"] = record_hash(record)
    lines[0] = json.dumps(record)
    write_lines(run_dir, lines)
    expected = r"record 2 \(line 2\): prev_hash does not match the record before it, record 1"
    with pytest.raises(LedgerError, match=expected):
        Ledger(run_dir / LEDGER_NAME).verify()


def test_removing_a_middle_record_breaks_the_chain(run_dir):
    lines = lines_of(run_dir)
    write_lines(run_dir, [lines[0], lines[2]])
    with pytest.raises(LedgerError, match=r"record 3 \(line 2\): prev_hash does not match"):
        Ledger(run_dir / LEDGER_NAME).verify()


def test_a_truncated_tail_is_detected_and_only_it_is_repaired(run_dir):
    path = run_dir / LEDGER_NAME
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"index": 4, "request": {"conc')  # a crash mid-append
    ledger = Ledger(path)
    with pytest.raises(LedgerError, match=r"line 4, the last, is not complete JSON.*--repair-tail"):
        ledger.verify()
    with pytest.raises(LedgerError):  # a broken chain is never extended
        ledger.append(make_record(4, "neon", "style", "a" * 64, "b" * 64))
    assert ledger.repair_tail().startswith('{"index": 4')
    assert path.read_bytes() == whole
    assert ledger.repair_tail() is None  # nothing more to remove
    assert len(ledger.verify()) == 3


def test_repair_tail_leaves_a_bad_middle_line_alone(run_dir):
    lines = lines_of(run_dir)
    lines[1] = lines[1][:20]
    write_lines(run_dir, lines)
    before = (run_dir / LEDGER_NAME).read_bytes()
    ledger = Ledger(run_dir / LEDGER_NAME)
    assert ledger.repair_tail() is None
    assert (run_dir / LEDGER_NAME).read_bytes() == before
    with pytest.raises(LedgerError, match="line 2 is not JSON"):
        ledger.verify()


def test_a_teacher_that_is_not_the_previous_student_is_detected(tmp_path):
    ledger = Ledger(tmp_path / LEDGER_NAME)
    ledger.append(make_record(1, "dots", "style", "a" * 64, "b" * 64))
    ledger.append(make_record(2, "circle", "object", "c" * 64, "d" * 64))
    with pytest.raises(LedgerError, match=r"record 2 \(line 2\): input_hash .* is not the output_hash of record 1"):
        ledger.verify()


def test_weights_hash_is_stable_and_sees_one_byte(tmp_path):
    folder = fake_pipeline(tmp_path / "pipe", b"weights" * 1000)
    first = weights_hash(folder)
    (folder / "model_index.json").write_text('{"changed": true}')  # not weights
    assert weights_hash(folder) == first
    tensor_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[3000] ^= 1
    tensor_file.write_bytes(bytes(data))
    assert weights_hash(folder) != first
    data[3000] ^= 1
    tensor_file.write_bytes(bytes(data))
    assert weights_hash(folder) == first
    assert weights_hash(tensor_file) != weights_hash(folder / "text_encoder" / "model.safetensors")


def test_weights_hash_sees_a_renamed_component(tmp_path):
    folder = fake_pipeline(tmp_path / "pipe", b"x")
    first = weights_hash(folder)
    (folder / "unet").rename(folder / "unet_moved")
    assert weights_hash(folder) != first


def test_weights_hash_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        weights_hash(tmp_path)


def test_verify_weights_accepts_the_real_folder_and_refuses_a_tampered_one(run_dir):
    ledger = Ledger(run_dir / LEDGER_NAME)
    folder = step_dir(run_dir, 2, "circle") / "pipeline"
    assert ledger.verify_weights(2, folder) == ledger.records()[1]["output_hash"]
    with pytest.raises(LedgerError, match=r"do not match ledger record 1 \(style 'dots'\)"):
        ledger.verify_weights(1, folder)  # another request's weights
    with open(folder / "text_encoder" / "model.safetensors", "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(LedgerError, match=rf"{folder}.*do not match ledger record 2 \(object 'circle'\)"):
        ledger.verify_weights(2, folder)


def run_command(*args):
    return subprocess.run(
        [sys.executable, "-m", "distill_forget.ledger", *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_the_command_accepts_a_good_run_and_refuses_a_tampered_one(run_dir):
    good = run_command(run_dir)
    assert good.returncode == 0, good.stderr
    assert "big dots" in good.stdout and "chain of 3 records verified" in good.stdout

    tensor_file = step_dir(run_dir, 3, "big dots") / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:-1] + b"!")
    bad = run_command(run_dir)
    assert bad.returncode != 0
    assert "do not match ledger record 3" in bad.stderr

    assert "RUN_DIR" in run_command("--help").stdout


def test_the_command_refuses_an_edited_ledger(run_dir):
    lines = lines_of(run_dir)
    lines[0] = lines[0].replace('"ua":95.0', '"ua":99.0')
    write_lines(run_dir, lines)
    result = run_command(run_dir)
    assert result.returncode != 0
    assert "record 1 (line 1): record_hash does not match" in result.stderr


def test_the_checkpoint_field_says_where_the_weights_are(tmp_path):
    folder = fake_pipeline(tmp_path / "elsewhere" / "pipeline", b"w")
    ledger = Ledger(tmp_path / "run" / LEDGER_NAME)
    record = make_record(1, "dots", "style", "a" * 64, weights_hash(folder), checkpoint="../elsewhere/pipeline")
    ledger.append(record)
    assert checkpoint_folder(tmp_path / "run", record) == tmp_path / "run" / "../elsewhere/pipeline"
    assert run_command(tmp_path / "run").returncode == 0
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other")
    assert "do not match ledger record 1" in run_command(tmp_path / "run").stderr


def test_the_printed_ledger_names_each_target_and_the_targets_the_check_tried():
    from distill_forget.ledger import format_table

    checked = {"kept": 1, "attempts": [{"target": "mosaic", "check": {"broken": {"ua": 5.56}}},
                                       {"target": "flat color", "check": {"broken": {}}}]}  # fmt: skip
    records = [
        {"index": 1, "request": {"concept": "dots"}, "targets": {"counts": {"flat color": 27}}, "check": checked},
        {"index": 2, "request": {"concept": "star"}, "targets": {"counts": {}}},  # ESD: no target
    ]
    first, second = format_table(records).splitlines()[1:]
    assert first.endswith("flat color; tried: mosaic (UA -5.56)")
    assert second.endswith(" -")
