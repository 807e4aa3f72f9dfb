"""scripts/bench_faults.py: a few cheap cases with real processes, the JSON rows they write, and
that the bench's own checks do see torn files, lost files and wrong exit statuses."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_faults.py"


def bench_module():
    if "bench_faults" in sys.modules:
        return sys.modules["bench_faults"]
    spec = importlib.util.spec_from_file_location("bench_faults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_faults"] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cheap_cases_hold_and_write_their_rows(tmp_path):
    report = tmp_path / "faults.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--only",
                           "fifo-in-raw-tree,png-bomb,lost-consolidated", "--json", str(report)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| fifo-in-raw-tree |" in done.stdout and "3 hold, 0 broken" in done.stdout
    record = json.loads(report.read_text())
    assert record["cases"] == ["fifo-in-raw-tree", "png-bomb", "lost-consolidated"]
    assert record["machine"]["cores"] >= 1
    rows = {row["case"]: row for row in record["rows"]}
    assert set(rows) == set(record["cases"]) and len(record["rows"]) == 3
    for row in record["rows"]:
        assert row["holds"] is True and row["verdict"] == "HOLDS", row
        assert "Traceback" not in row["line"] and "\n" not in row["line"]
        assert row["lost_torn"] == [] and row["problems"] == []
    assert rows["fifo-in-raw-tree"]["status"] == 1
    assert rows["fifo-in-raw-tree"]["line"].startswith("error: raw_fifo/leftImg8bit/train/")
    assert "FIFO" in rows["fifo-in-raw-tree"]["line"]
    assert rows["png-bomb"]["status"] == 1 and "100000x100000" in rows["png-bomb"]["line"]
    assert rows["lost-consolidated"]["status"] == 0


def test_unknown_case_names_are_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "no-such-case"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown case(s) no-such-case" in done.stderr


def test_the_checks_see_torn_lost_and_leftover_files(tmp_path):
    bench = bench_module()
    folder = tmp_path / "out"
    png = bench.noise_image(folder / "x.png").read_bytes()
    (folder / "x.png").write_bytes(png[:-30])                        # truncated
    (folder / "metrics.jsonl").write_text('{"loss": 1.0}\n{"loss": NaN}\n')
    (folder / "config.yaml").write_text("a: [1,\n")
    (folder / "scores.json").write_text("{}")
    (folder / "last.pt.tmp").write_bytes(b"half")
    found = bench.torn(folder)
    assert [p.split()[0:2] for p in found] == [
        ["torn", "out/config.yaml"], ["leftover", "out/last.pt.tmp"], ["torn", "out/metrics.jsonl"],
        ["torn", "out/x.png"]]
    assert bench.torn(folder, temps_allowed=True, skip=("x.png", "config", "metrics")) == []
    before = bench.snapshot(folder)
    (folder / "scores.json").write_text('{"changed": 1}')
    (folder / "config.yaml").unlink()
    assert sorted(bench.lost(before, folder)) == ["changed out/scores.json", "lost out/config.yaml"]


@pytest.mark.parametrize("status, expect, holds", [
    (1, "1", True), (0, "1", False), (3, "3", True), (-9, "signal", True), (0, "signal", False),
    (2, "non-zero", True), ("timeout (5 s)", "1", False), (1, "0 or 1", True)])
def test_a_row_holds_only_with_the_expected_status(status, expect, holds):
    bench = bench_module()
    row = bench.Row("c", "n", "cmd", expect, status=status).judge()
    assert row.holds is holds and row.verdict == ("HOLDS" if holds else "BROKEN")


def test_a_traceback_or_two_error_lines_break_a_row():
    bench = bench_module()
    b = bench.Bench(Path("/nonexistent"))
    row = b.check(bench.Row("c", "n", "cmd", "1"), 1, "", "Traceback (most recent call last):\n"
                  "  ...\nerror: one\nerror: two\n", 0.1, want=("three",)).judge()
    assert row.verdict == "BROKEN" and row.line == "error: one"
    assert row.problems == ["a Traceback in the output", "2 error lines",
                            "the output does not say 'three'"]
    assert bench.message_line("", "build ━━━ 2/2\nok: 4 rows\n") == "ok: 4 rows"
