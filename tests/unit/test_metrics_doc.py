"""docs/metrics.md is generated from the daemon's registry: the table there must be what the code exports.

When this fails after a change to ``linewatch/service/telemetry/prometheus.py``, regenerate the table:
``python -m linewatch.service.telemetry.prometheus --update docs/metrics.md``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import Gauge

from linewatch.errors import ConfigError
from linewatch.service.telemetry.prometheus import (
    TABLE_BEGIN,
    TABLE_END,
    Metrics,
    main,
    metrics_table,
    replace_table,
    table_in,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
UPDATE = "python -m linewatch.service.telemetry.prometheus --update docs/metrics.md"


def rows(table: str) -> dict[str, list[str]]:
    """metric name → [type, labels, help] for each row of a generated table."""
    out = {}
    for line in table.splitlines():
        m = re.match(r"^\| `([a-z_:][a-z0-9_:]*)` \| (.*) \|$", line)
        if m:
            out[m.group(1)] = [c.strip() for c in m.group(2).split(" | ")]
    return out


def test_the_documented_table_is_what_the_registry_exports():
    documented = table_in(DOC.read_text(encoding="utf-8"))
    assert documented == metrics_table(), f"docs/metrics.md is out of date with the code: run `{UPDATE}`"


def test_the_check_notices_a_new_metric_and_an_edited_doc():
    """The comparison above can fail: a metric added in code, or a row edited by hand, makes a difference."""
    base = metrics_table()
    m = Metrics()
    Gauge("linewatch_new_thing", "Something new", ["camera"], registry=m.registry)
    grown = metrics_table(m)
    assert grown != base and rows(grown)["linewatch_new_thing"] == ["gauge", "camera", "Something new"]
    doc = replace_table(DOC.read_text(encoding="utf-8"), base)
    edited = doc.replace("Frames read and queued for inference", "Frames read")
    assert edited != doc and table_in(edited) != base


def test_every_exported_family_has_a_row_with_its_exposed_name_type_and_labels():
    table = rows(metrics_table())
    m = Metrics()
    m.init_cameras(["cam"])
    m.set_model(backbone="b", model_id="m", input_size=(8, 8), device="cpu", image_threshold=1.0,
                pixel_threshold=1.0)
    # the drift gauges are set by the health observer only; give them a sample so their labels can be checked
    for gauge in (m.fail_rate, m.score_median_ratio, m.brightness, m.sharpness_ratio):
        gauge.labels("cam").set(1)
    seen = 0
    for family in m.registry.collect():
        # the row is named as PromQL names the family: counters with _total, info with _info, histograms bare
        rows_for = [n for n in (family.name, f"{family.name}_total", f"{family.name}_info") if n in table]
        assert len(rows_for) == 1, f"{family.name}: rows {rows_for}"
        row = rows_for[0]
        assert table[row][0] == family.type, row
        assert {s.name for s in family.samples} <= {row, f"{row}_bucket", f"{row}_sum", f"{row}_count"}, row
        sample_labels = {k for s in family.samples for k in s.labels if k != "le"}
        documented = set(table[row][1].split(", ")) - {"—"}
        assert documented == sample_labels, f"{row}: documented labels {documented}, exported {sample_labels}"
        assert table[row][2], f"{row}: no help text"
        seen += 1
    assert seen == len(table), "rows without a family on the registry"
    assert "linewatch_verdicts_total" in table and "linewatch_frames_total" in table
    assert table["linewatch_frames_total"][2].startswith("DEPRECATED: use linewatch_verdicts_total")
    assert table["linewatch_model_info"][1] == "backbone, model_id, input_size, device"


def test_no_other_markdown_file_keeps_a_copy_of_the_table():
    """The daemon's metrics reference lives in docs/metrics.md only; other documents link to it. (The bridge's
    own registry, ``linewatch_bridge_*``, is documented with the bridge in docs/connect-a-line.md.)"""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    files = [ROOT / f for f in listed.stdout.split()] if listed.returncode == 0 else list(ROOT.glob("**/*.md"))
    copies = []
    for path in files:
        if path == DOC or ".venv" in path.parts or not path.exists():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"^\|\s*`(linewatch_(?!bridge_)|process_)[a-z0-9_]+(\{[^}]*\})?`", line):
                copies.append(f"{path.relative_to(ROOT)}:{n}: {line[:80]}")
    assert not copies, "metric table rows outside docs/metrics.md (link to it instead):\n" + "\n".join(copies)


def test_update_rewrites_only_between_the_markers(tmp_path, capsys):
    doc = tmp_path / "metrics.md"
    doc.write_text(f"# Metrics\n\nintro\n\n{TABLE_BEGIN}\n| stale |\n{TABLE_END}\n\nafter\n", encoding="utf-8")
    assert main(["--update", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Metrics\n\nintro\n\n") and text.endswith(f"{TABLE_END}\n\nafter\n")
    assert "| stale |" not in text and table_in(text) == metrics_table()
    assert main(["--update", str(doc)]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert doc.read_text(encoding="utf-8") == text


def test_update_refuses_a_document_without_markers_in_one_line(tmp_path, capsys):
    doc = tmp_path / "metrics.md"
    doc.write_text("# Metrics\n\nno markers\n", encoding="utf-8")
    assert main(["--update", str(doc)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no table markers" in err and "Traceback" not in err
    assert doc.read_text(encoding="utf-8") == "# Metrics\n\nno markers\n"
    with pytest.raises(ConfigError):
        table_in("no markers")


def test_markdown_prints_the_table(capsys):
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == metrics_table()
