"""The audit ledger of a run: which model came from which, by which request, with what result.

`RUN_DIR/ledger.jsonl` holds one JSON line per finished request, appended in order and never
rewritten. Each record carries the content hash of the teacher's weights (`input_hash`) and of
the student's (`output_hash`), the hash of the record before it (`prev_hash`; `GENESIS` for the
first) and its own hash (`record_hash`: sha256 of the canonical JSON of the record without
`record_hash`). So editing any field of any record, or removing, inserting or reordering
records, breaks the chain at a record that `verify()` names. The weights form a chain too: the
teacher of request i is the student of request i-1, so `input_hash` of record i must equal
`output_hash` of record i-1. A checkpoint folder is checked against the record that produced
it with `verify_weights`.

What the chain cannot show: that whole records were removed from the END. Compare the number
of records with the requests the run was given.

A crash during an append leaves an incomplete last line. `verify()` reports it as an error
naming the line rather than quietly skipping it, because a ledger that hides a line is not an
audit. `Ledger.repair_tail()` (or `--repair-tail` on the command line) removes that one line,
and only when it is the last line and not JSON; the request it belonged to is then run again.

    python -m distill_forget.ledger RUN_DIR    # table + chain check + weights check
"""

import argparse
import hashlib
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from distill_forget.report import checked_targets

LEDGER_NAME = "ledger.jsonl"
GENESIS = "0" * 64  # prev_hash of the first record
REQUIRED_FIELDS = (
    "index", "request", "settings", "started", "finished", "targets", "neighbors",
    "metrics", "input_hash", "output_hash",
)  # fmt: skip
READ_CHUNK = 8 << 20  # weights are hashed in 8 MiB reads, so multi-GB files never sit in memory


class LedgerError(ValueError):
    """The ledger, or weights checked against it, are not what was recorded."""


def utc_now() -> str:
    """The time now as ISO 8601 UTC, the format of `started` and `finished`."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def slug(text: str) -> str:
    """A concept name as a folder-name part: `Big Dots!` -> `big-dots`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"


def step_dir(run_dir, index: int, concept: str) -> Path:
    """Where request `index` keeps its results: `RUN_DIR/steps/<index:02d>-<slug>`."""
    return Path(run_dir) / "steps" / f"{index:02d}-{slug(concept)}"


def weights_hash(path) -> str:
    """sha256 over every `*.safetensors` file of a pipeline folder, or over one file.

    For a folder each file contributes its relative path and its bytes, in sorted path order,
    so moving a tensor file between components changes the hash. A single file contributes its
    bytes only: its name says where it is kept, not what it holds.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        files = [(None, path)]
    else:
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*.safetensors") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{path} holds no *.safetensors files")
    digest = hashlib.sha256()
    for relative, file in files:
        if relative is not None:
            # Length-framed, so no path/bytes boundary can be shifted to fake another folder.
            digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as stream:
            while chunk := stream.read(READ_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def canonical_json(record: dict) -> str:
    """One line, sorted keys, ASCII only: the same record always gives the same text."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def record_hash(record: dict) -> str:
    """sha256 of the canonical JSON of `record` without its `record_hash`."""
    body = {key: value for key, value in record.items() if key != "record_hash"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _name(record, line: int) -> str:
    """How messages name a record: by its request index, and by line for an editor."""
    index = record.get("index") if isinstance(record, dict) else None
    return f"record {index} (line {line})" if index is not None else f"line {line}"


class Ledger:
    """One ledger file; a run's is `Ledger(run_dir / LEDGER_NAME)`."""

    def __init__(self, path):
        self.path = Path(path)

    def _lines(self) -> list[str]:
        if not self.path.exists():
            return []
        # Split on "\n" only: str.splitlines would also split on characters JSON may carry.
        lines = self.path.read_text(encoding="utf-8", errors="replace").split("\n")
        return lines[:-1] if lines[-1] == "" else lines  # the newline ending the last record

    def records(self) -> list[dict]:
        """The records in order; LedgerError for a line that is not a JSON object."""
        lines = self._lines()
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if number == len(lines):
                    raise LedgerError(
                        f"{self.path}: line {number}, the last, is not complete JSON ({err.msg}): "
                        "probably a crash while appending. Remove it with "
                        f"`python -m distill_forget.ledger {self.path.parent} --repair-tail` "
                        "and run that request again."
                    ) from err
                raise LedgerError(
                    f"{self.path}: line {number} is not JSON ({err.msg}) and is not the last line, "
                    "so not an interrupted append"
                ) from err
            if not isinstance(record, dict):
                raise LedgerError(f"{self.path}: line {number} is JSON but not a record (got {type(record).__name__})")
            records.append(record)
        return records

    def verify(self) -> list[dict]:
        """Check every record's hash and the chain; return the records, or raise LedgerError."""
        records = self.records()
        previous = None
        for number, record in enumerate(records, start=1):
            name = _name(record, number)
            if record.get("record_hash") != record_hash(record):
                raise LedgerError(
                    f"{self.path}: {name}: record_hash does not match its contents: "
                    "the record was changed after it was written"
                )
            expected_prev = previous["record_hash"] if previous else GENESIS
            if record.get("prev_hash") != expected_prev:
                before = "the start of the ledger"
                if previous:
                    before = f"the record before it, {_name(previous, number - 1)}"
                raise LedgerError(
                    f"{self.path}: {name}: prev_hash does not match {before}: "
                    "records were removed, inserted or reordered"
                )
            # The teacher of each request is the student the request before it produced (in the
            # sequential setting; the others start every request from the first one's teacher).
            if previous and record.get("setting", "sequential") != "sequential":
                if record.get("input_hash") != records[0].get("input_hash"):
                    raise LedgerError(
                        f"{self.path}: {name}: input_hash is not the starting model of record 1, "
                        f"as the {record['setting']!r} setting requires"
                    )
            elif previous and record.get("input_hash") != previous.get("output_hash"):
                raise LedgerError(
                    f"{self.path}: {name}: input_hash (the teacher's weights) is not the output_hash of "
                    f"{_name(previous, number - 1)}: this request did not start from the previous model"
                )
            previous = record
        return records

    def append(self, record: dict) -> dict:
        """Add one finished request; fills `prev_hash` and `record_hash` and returns the stored record.

        The existing ledger is verified first, so a broken chain is never extended. `index`
        counts requests from 1 and must follow the last record's.
        """
        missing = [key for key in REQUIRED_FIELDS if key not in record]
        if missing:
            raise ValueError(f"ledger record {record.get('index', '?')} lacks the fields {missing}")
        if "prev_hash" in record or "record_hash" in record:
            raise ValueError("a new ledger record must not carry prev_hash or record_hash; append() fills them")
        existing = self.verify()
        expected_index = existing[-1]["index"] + 1 if existing else 1
        if type(record["index"]) is not int or record["index"] != expected_index:
            raise ValueError(f"ledger record index {record['index']!r}: the next request is {expected_index}")
        # Hash what a reader will parse back (tuples become lists, int keys strings), not the input.
        stored = json.loads(json.dumps(record))
        stored["prev_hash"] = existing[-1]["record_hash"] if existing else GENESIS
        stored["record_hash"] = record_hash(stored)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A whole last record whose newline was lost in a crash must not be glued to this one.
        separator = "\n" if existing and not self._ends_with_newline() else ""
        # Append mode, one write, fsync: earlier lines are never rewritten, and a record the
        # caller saw returned is on disk.
        with open(self.path, "a", encoding="ascii") as stream:
            stream.write(separator + canonical_json(stored) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        return stored

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as stream:
            stream.seek(-1, os.SEEK_END)
            return stream.read(1) == b"\n"

    def repair_tail(self) -> str | None:
        """Remove the last line if it is not JSON (a crash mid-append); return it, or None.

        Nothing else is ever removed: a bad line before the last, or a last line that parses
        but fails its hash, is evidence and stays for `verify()` to report.
        """
        from distill_forget.storage import atomic_file  # here, so the ledger command starts without torch

        if not self.path.exists():
            return None
        lines = self.path.read_bytes().split(b"\n")
        if lines[-1] == b"":
            lines.pop()  # the newline ending the last record
        if not lines:
            return None
        try:
            json.loads(lines[-1])
            return None
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            pass
        with atomic_file(self.path) as tmp:
            tmp.write_bytes(b"".join(line + b"\n" for line in lines[:-1]))
        return lines[-1].decode("utf-8", errors="replace")

    def verify_weights(self, index: int, folder) -> str:
        """Check that `folder` holds the weights request `index` produced; return their hash."""
        record = next((r for r in self.records() if r.get("index") == index), None)
        if record is None:
            raise LedgerError(f"{self.path}: no record for request {index}")
        try:
            actual = weights_hash(folder)
        except FileNotFoundError as err:
            raise LedgerError(f"weights of ledger record {index}: {err}") from err
        if actual != record.get("output_hash"):
            raise LedgerError(
                f"{folder}: weights do not match ledger record {index} ({request_label(record)}): their hash is "
                f"{actual[:16]}..., the ledger recorded {str(record.get('output_hash'))[:16]}...; "
                "the folder was changed or replaced after the request finished"
            )
        return actual


def request_label(record: dict) -> str:
    request = record.get("request") or {}
    return f"{request.get('kind', '?')} {request.get('concept', '?')!r}"


def checkpoint_folder(run_dir, record: dict) -> Path:
    """The pipeline folder of a record: its `checkpoint` field (relative to the run), else the layout's."""
    if record.get("checkpoint"):
        return Path(run_dir) / record["checkpoint"]  # an absolute checkpoint path stays absolute
    return step_dir(run_dir, record["index"], (record.get("request") or {}).get("concept", "")) / "pipeline"


def format_table(records: list[dict]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)

    header = ("#", "concept", "kind", "finished", "UA", "IRA", "CRA", "NRA", "output hash", "mapped onto")
    rows = [header]
    for record in records:
        request, metrics = record.get("request") or {}, record.get("metrics") or {}
        targets = record.get("targets") or {}  # a loop record: {"counts": {target: prompts}, ...}
        targets = ", ".join(targets.get("counts") or {} if isinstance(targets, dict) else map(str, targets)) or "-"
        rows.append(
            (
                cell(record.get("index")), cell(request.get("concept")), cell(request.get("kind")),
                cell(record.get("finished")), *(cell(metrics.get(key)) for key in ("ua", "ira", "cra", "nra")),
                str(record.get("output_hash", "-"))[:12], targets + checked_targets(record.get("check")),
            )
        )  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill_forget.ledger",
        description="Print a run's ledger, verify its hash chain and check each step's weights against it.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run folder holding ledger.jsonl")
    parser.add_argument(
        "--repair-tail", action="store_true", help="first remove a last line left incomplete by a crash"
    )
    args = parser.parse_args(argv)
    ledger = Ledger(args.run_dir / LEDGER_NAME)
    if not ledger.path.exists():
        print(f"error: {ledger.path} does not exist", file=sys.stderr)
        return 2
    if args.repair_tail:
        removed = ledger.repair_tail()
        if removed is None:
            print("the last line is whole; nothing removed")
        else:
            print(f"removed the incomplete last line: {removed!r}")
    try:
        records = ledger.verify()
    except LedgerError as err:
        print(f"ledger check FAILED: {err}", file=sys.stderr)
        return 1
    print(format_table(records))
    print(f"chain of {len(records)} records verified")
    failures = 0
    for record in records:
        folder = checkpoint_folder(args.run_dir, record)
        if not folder.exists():
            print(f"record {record['index']}: no weights at {folder}; not checked")
            continue
        print(f"record {record['index']}: hashing {folder} ...", flush=True)
        try:
            ledger.verify_weights(record["index"], folder)
        except LedgerError as err:
            print(f"weights check FAILED: {err}", file=sys.stderr)
            failures += 1
    if failures:
        print(f"{failures} weights folder(s) do not match {ledger.path}", file=sys.stderr)
        return 1
    print(f"ledger {ledger.path} and the weights found are consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
