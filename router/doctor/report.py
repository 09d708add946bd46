"""The doctor's report: text with ✓ / ✗ / skipped lines, or JSON for scripts (pure)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from router.doctor.checks import SECTIONS, CheckResult

MARKS = {"ok": "\u2713", "fail": "\u2717", "skipped": "-"}


def counts(results: Sequence[CheckResult]) -> dict[str, int]:
    out = {"ok": 0, "fail": 0, "skipped": 0}
    for r in results:
        out[r.status] += 1
    return out


def text(results: Sequence[CheckResult]) -> str:
    """One line per result under its section's heading, the evidence indented below it (for
    passing checks too: dates and counts are what an operator compares), then a failure's fix.
    """
    lines: list[str] = []
    for section, heading in SECTIONS:
        mine = [r for r in results if r.section == section]
        if not mine:
            continue
        lines.append(heading)
        for r in mine:
            if r.status == "skipped":
                why = r.evidence[0] if r.evidence else ""
                lines.append(f"  {MARKS['skipped']} {r.title}: skipped: {why}")
                continue
            lines.append(f"  {MARKS[r.status]} {r.title}")
            for e in r.evidence:
                lines.append(f"      {e}")
            if r.fix:
                lines.append(f"      fix: {r.fix}")
    c = counts(results)
    lines.append("")
    lines.append(f"{c['ok']} ok, {c['fail']} failed, {c['skipped']} skipped")
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[CheckResult]) -> str:
    doc = {
        "kind": "DoctorReport",
        "summary": counts(results),
        "checks": [r.to_json() for r in results],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
