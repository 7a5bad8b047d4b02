"""The conversion report: the accounting (inputs = written + skipped), its text, and provenance.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from hvd_yolo.shards.format import MANIFEST


def build_report(n: int, valid: int, num_shards: int, issues: list[dict[str, Any]],
            counts: dict[str, int], notes: list[str]) -> dict[str, Any]:
    skipped = [i for i in issues if i["kind"] == "skipped"]
    box_issues = [i for i in issues if i["kind"] in ("clipped", "dropped")]
    reencoded = [i for i in issues if i["kind"] == "reencoded"]
    assert n == valid + len(skipped), (n, valid, len(skipped))
    return {
        "inputs": n,
        "written": valid,
        "skipped": len(skipped),
        "num_shards": num_shards,
        "boxes_seen": counts["seen"],
        "boxes_written": counts["written"],
        "boxes_clipped": counts["clipped"],
        "boxes_dropped": counts["dropped"],
        "boxes_in_skipped_items": counts["in_skipped"],
        "skipped_items": skipped,
        "box_issues": box_issues,
        "reencoded": reencoded,
        "notes": notes,
    }


def created_by(command: list[str] | None, ranks: int) -> dict[str, Any]:
    from hvd_yolo import __version__

    return {"command": command if command is not None else list(sys.argv), "ranks": ranks,
            "hvd_yolo": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def format_report(report: dict[str, Any], max_lines: int = 20) -> str:
    """The end-of-conversion summary: inputs = written + skipped, boxes, then the issues."""
    r = report
    lines = [
        f"inputs {r['inputs']} = written {r['written']} + skipped {r['skipped']}"
        f" -> {r['num_shards']} shard(s) in {r.get('out', '?')}",
        f"boxes  {r['boxes_seen']} seen = written {r['boxes_written']} + dropped "
        f"{r['boxes_dropped']} + in skipped items {r['boxes_in_skipped_items']}"
        f" ({r['boxes_clipped']} clipped to the image)",
    ]
    if r.get("reencoded"):
        lines.append(f"re-encoded losslessly as PNG (--reencode png): {len(r['reencoded'])} of the "
                     "written images")
    for title, rows in (("skipped", r["skipped_items"]), ("box issues", r["box_issues"]),
                        ("re-encoded", r.get("reencoded", []))):
        if rows:
            lines.append(f"{title}:")
            for i in rows[:max_lines]:
                where = f"{i['file']}:{i['line']}" if i["line"] else i["file"]
                lines.append(f"  {where}: {i['reason']}")
            if len(rows) > max_lines:
                lines.append(f"  ... and {len(rows) - max_lines} more (all listed in "
                             f"{MANIFEST} under report)")
    lines += [f"note: {note}" for note in r.get("notes", [])]
    return "\n".join(lines)
