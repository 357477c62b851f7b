"""RESULTS.md's generated tables: what their committed JSON renders to, measured on what ships."""

import json
import re
from pathlib import Path

import pytest

from benchmarks import provenance
from benchmarks.tables import BEGIN, END, RESULTS, render, write_section

ROOT = Path(__file__).parent.parent


def generated_section() -> str:
    text = RESULTS.read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def results_folder() -> Path:
    return ROOT / re.search(r"JSON: `([^`]+)/`", generated_section()).group(1)


def test_generated_tables_are_what_their_json_renders():
    assert generated_section() == render(results_folder()).strip(), "run python -m benchmarks.tables --folder ..."


def test_generated_tables_were_measured_on_the_shipped_model_and_judge():
    record = json.loads((results_folder() / "provenance.json").read_text())
    now = provenance.current()
    for name in ("model", "judge"):
        assert record[name] == now[name], (
            f"RESULTS.md's tables were measured with another {name} ({record[name][:12]}, shipped: {now[name][:12]}): "
            "re-measure with python -m benchmarks.rerun (--quick for a few seeds)")


def test_the_section_is_rewritten_and_the_rest_kept(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "provenance.json").write_text(json.dumps({
        "mode": "quick", "model": "a" * 64, "judge": "b" * 64, "arguments": {"shapes_quality": ["--seeds", "2"]},
        "seconds": {"shapes_quality": 120.0}, "finished": "2026-12-07 12:00"}))
    row = {"prompts": 2, "exact": 0.5, "placement": None, "placement_n": 0, "shape_word_peak_in_object": 1.0}
    (folder / "shapes_quality.json").write_text(json.dumps({
        "judge": {"scenes": 10, "exact_clean": 1.0, "exact_blur1_noise10": 0.9}, "model": {"one object": row}}))
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# head\n\n{BEGIN}\nold table\n{END}\n\n## history\n")
    write_section(folder, results)
    text = results.read_text()
    assert text.startswith("# head\n\n") and text.endswith(f"{END}\n\n## history\n") and "old table" not in text
    assert "| one object | 2 | 50.0 % |  | 100.0 % |" in text
    assert "Judge on 10 renders: 100.0 % exact clean, 90.0 % blurred and noisy." in text
    assert "`python -m benchmarks.rerun --quick` (shapes_quality --seeds 2)" in text and "`aaaaaaaaaaaa`" in text and "(2 min)" in text
    results.write_text("# no markers\n")
    with pytest.raises(ValueError, match="has no generated section"):
        write_section(folder, results)
