"""The benchmarks' shared report helpers."""

from __future__ import annotations

from pathlib import Path

from report import markers, percentile, write_section


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.99) == 3.0


def test_sections_are_added_once_then_replaced(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nIntro stays.\n")
    begin, end = markers("x-bench")
    write_section(page, "x-bench", "X", f"{begin}\nfirst\n{end}")
    write_section(page, "x-bench", "X", f"{begin}\nsecond\n{end}")
    text = page.read_text()
    assert text.count("## X") == 1
    assert "second" in text
    assert "first" not in text
    assert text.startswith("# Benchmarks\n\nIntro stays.")
