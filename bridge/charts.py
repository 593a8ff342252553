"""The digest's optional charts (the `charts` extra: matplotlib), drawn in a child process off the event loop."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import io
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from bridge.report import CLAIM_BUCKET_LABELS, Report, day_label

log = logging.getLogger(__name__)

RENDER_TIMEOUT = 60.0  # seconds: a child that takes longer is killed, and the digest goes out as text
SIZE = (6.0, 2.8)  # inches at DPI: 600 x 280 pixels, small enough for a chat message
DPI = 100


@dataclass(frozen=True)
class Chart:
    """One PNG to attach to the digest."""

    filename: str
    title: str
    png: bytes


def available() -> bool:
    """The `charts` extra is installed (found, not imported: matplotlib takes a second to import)."""
    return importlib.util.find_spec("matplotlib") is not None


async def render_charts(report: Report) -> list[Chart]:
    """The report's charts, drawn by `python -m bridge.charts` in a child process; [] without the extra or on failure.

    Drawing blocks for a second or so (the import, then each figure), which would stall every
    answer and webhook of this replica: the child does it while the loop carries on.
    """
    if not available():
        return []
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.charts",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        log.warning("digest charts not drawn (%s); the digest goes out as text", exc)
        return []
    try:
        async with asyncio.timeout(RENDER_TIMEOUT):
            out, err = await child.communicate(json.dumps(report.to_json()).encode())
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
        log.warning("digest charts took over %.0f s and were dropped; the digest goes out as text", RENDER_TIMEOUT)
        return []
    if child.returncode != 0:
        last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        log.warning("digest charts failed (exit %s: %s); the digest goes out as text", child.returncode, last)
        return []
    return [Chart(c["filename"], c["title"], base64.b64decode(c["png"])) for c in json.loads(out)]


def draw(report: Report) -> list[Chart]:
    """The charts worth drawing: questions per day (when there were any), time to claim (when alerts were claimed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: PNGs in memory
    from matplotlib import pyplot

    charts: list[Chart] = []
    bots = [bot for bot in report.chatbots if any(bot.per_day)]
    if bots:
        figure, axes = pyplot.subplots(figsize=SIZE, dpi=DPI)
        labels = [day_label(day) for day in report.days]
        bottom = [0] * len(labels)
        for bot in bots:
            axes.bar(labels, bot.per_day, bottom=bottom, label=(bot.name or bot.chatbot[:8]))
            bottom = [b + n for b, n in zip(bottom, bot.per_day, strict=True)]
        _finish(axes, "Questions per day", legend=len(bots) > 1)
        charts.append(Chart("questions-per-day.png", "Questions per day", _png(figure)))
        pyplot.close(figure)
    claimed = [sum(bucket) for bucket in zip(*(bot.claim_buckets for bot in report.chatbots), strict=True)]
    if any(claimed):
        figure, axes = pyplot.subplots(figsize=SIZE, dpi=DPI)
        axes.bar(CLAIM_BUCKET_LABELS, claimed, color="#c0504d")
        _finish(axes, "Alerts by time to claim", legend=False)
        charts.append(Chart("time-to-claim.png", "Alerts by time to claim", _png(figure)))
        pyplot.close(figure)
    return charts


def _finish(axes: Any, title: str, *, legend: bool) -> None:
    axes.set_title(title)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.spines[["top", "right"]].set_visible(False)
    if legend:
        axes.legend(fontsize="small", frameon=False)
    axes.figure.tight_layout()


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def main() -> None:
    """The child: a report as JSON on stdin, its charts as JSON (PNG in base64) on stdout."""
    report = Report.from_json(json.load(sys.stdin))
    charts = [
        {"filename": c.filename, "title": c.title, "png": base64.b64encode(c.png).decode()} for c in draw(report)
    ]
    json.dump(charts, sys.stdout)


if __name__ == "__main__":
    main()
