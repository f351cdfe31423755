"""The status page at `/`: what the archive holds and how well it compresses, what waits
(tier backlog, parked and flagged objects), who sent lately, with two plots drawn on the
server (plots.py). One self-contained HTML page: no script, no style sheet, no CDN."""

from __future__ import annotations

from html import escape
from typing import Any

from compacs.service.web import plots
from compacs.service.web.domain import Domain


def page(domain: Domain) -> str:
    stats = domain.stats()
    by_codec = stats["by_codec"]
    codecs = list(by_codec)
    ratio_plot = plots.bars(
        "compression ratio by codec",
        codecs,
        [float(by_codec[c].get("ratio") or 0) for c in codecs],
        "×",
    )
    hourly = domain.ingest_by_hour()
    labels = [("-24h" if i == 0 else "now" if i == 23 else "") for i in range(24)]
    rate_plot = plots.bars("objects received per hour, last 24 hours", labels, hourly)
    backlog = domain.tier_backlog()
    associations = domain.associations()
    senders = domain.recent_senders()
    summary = [
        ("instances", stats["instances"]),
        ("studies", stats["studies"]),
        ("bytes received", _bytes(stats["bytes_received"])),
        ("bytes stored", _bytes(stats["bytes_stored"])),
        ("ratio", _ratio(stats)),
        ("pending compression", stats["pending"]),
        ("parked (compacs problems)", stats["parked"]),
        ("flagged", stats["flagged"]),
        ("PatientID conflicts", stats["patient_id_conflicts"]),
    ]
    body = [
        "<h1>compacs</h1>",
        _table(["", ""], [[k, v] for k, v in summary]),
        "<h2>Ratio by codec</h2>",
        ratio_plot,
        _groups(by_codec, "codec"),
        "<h2>Ratio by modality</h2>",
        _groups(stats["by_modality"], "modality"),
        "<h2>Tiers</h2>",
        _groups(stats["by_tier"], "tier"),
        _table(
            ["tier", "backlog at the last tier run"],
            [[t, int(n)] for t, n in sorted(backlog.items())] or [["-", "no tier run yet"]],
        ),
        "<h2>Ingest rate</h2>",
        rate_plot,
        "<h2>Recent associations</h2>",
        _table(
            ["associations since start", "count"],
            [[r, int(n)] for r, n in sorted(associations.items())],
        ),
        _table(
            ["calling AE (last 24 hours)", "objects", "last received"],
            [[ae, n, str(last)[:19]] for ae, n, last in senders] or [["-", 0, "-"]],
        ),
    ]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        # no icon: else the browser asks /favicon.ico, which is a 404 (or the viewer's)
        '<link rel="icon" href="data:,">'
        "<title>compacs status</title></head>"
        '<body style="font-family:sans-serif;max-width:60em;margin:1em auto">'
        + "".join(body)
        + "</body></html>"
    )


def _groups(groups: dict[str, dict[str, Any]], name: str) -> str:
    rows = [
        [key, g["instances"], _bytes(g["bytes_received"]), _bytes(g["bytes_stored"]), _ratio(g)]
        for key, g in groups.items()
    ]
    return _table([name, "instances", "received", "stored", "ratio"], rows or [["-"] * 5])


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{escape(str(h))}</th>" for h in head)
    out = [f'<table border="1" cellpadding="4" style="border-collapse:collapse"><tr>{cells}</tr>']
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _bytes(n: Any) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _ratio(group: dict[str, Any]) -> str:
    ratio = group.get("ratio")
    return f"{float(ratio):.2f}" if ratio else "-"
