"""Read every process's /metrics: a sans-IO parser of the exposition text and a concurrent scraper.

The overview needs a few dozen series out of each process's few hundred, so the parser keeps only
the names it is asked for and never builds the full family objects prometheus-client's own parser
does (that one costs ~10x more per line; 60 room instances are ~60 scrapes per sample).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp

from services.common.discovery import Instance

# One /metrics body: a room instance's is ~15 KiB, a center's with its histograms ~60 KiB.
# A body past this is not ours (or something is badly wrong): it is not read.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Labels of one series we keep; our series have at most three.
MAX_LABELS = 8

Labels = tuple[tuple[str, str], ...]


class MetricsTextError(ValueError):
    """A /metrics body that is not Prometheus text exposition (the peer's fault)."""


@dataclass(slots=True)
class Scrape:
    """What one process reported: series name -> {labels: value}. ``error`` when it did not answer."""

    instance: Instance
    series: dict[str, dict[Labels, float]] = field(default_factory=dict)
    error: str = ""

    def value(self, name: str, **match: str) -> float:
        """Sum of ``name`` over the series whose labels include ``match``."""
        total = 0.0
        for labels, v in self.series.get(name, {}).items():
            if match and not all((k, val) in labels for k, val in match.items()):
                continue
            total += v
        return total

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``name`` summed per value of one label."""
        out: dict[str, float] = {}
        for labels, v in self.series.get(name, {}).items():
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
        return out


def _parse_labels(text: str) -> Labels:
    """``a="x",b="y\\"z"`` -> (("a","x"),("b",'y"z')). Raises MetricsTextError on malformed text."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i >= n:
            break
        eq = text.find("=", i)
        if eq < 0 or eq + 1 >= n or text[eq + 1] != '"':
            raise MetricsTextError(f"bad label set: {text[:80]!r}")
        name = text[i:eq].strip()
        j = eq + 2
        value: list[str] = []
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                j += 1
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(text[j], "\\" + text[j]))
            else:
                value.append(text[j])
            j += 1
        if j >= n:
            raise MetricsTextError(f"unterminated label value: {text[:80]!r}")
        out.append((name, "".join(value)))
        if len(out) > MAX_LABELS:
            raise MetricsTextError("too many labels on one series")
        i = j + 1
    return tuple(sorted(out))


def parse(text: str, wanted: Iterable[str]) -> dict[str, dict[Labels, float]]:
    """The samples of the ``wanted`` series names in Prometheus text exposition ``text``."""
    names = frozenset(wanted)
    out: dict[str, dict[Labels, float]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if space < 0:
            raise MetricsTextError(f"no value on line {line[:80]!r}")
        if 0 <= brace < space:
            name = line[:brace]
            if name not in names:
                continue
            close = line.rfind("}")
            if close < brace:
                raise MetricsTextError(f"unclosed label set on line {line[:80]!r}")
            labels = _parse_labels(line[brace + 1:close])
            rest = line[close + 1:]
        else:
            name = line[:space]
            if name not in names:
                continue
            labels = ()
            rest = line[space:]
        fields = rest.split()
        if not fields:
            raise MetricsTextError(f"no value on line {line[:80]!r}")
        try:
            value = float(fields[0])
        except ValueError as exc:
            raise MetricsTextError(f"bad value on line {line[:80]!r}") from exc
        if math.isnan(value):
            continue
        series = out.setdefault(name, {})
        series[labels] = series.get(labels, 0.0) + value
    return out


class MetricsScraper:
    """Scrapes many processes at once, each with a short timeout; one that does not answer in time
    is reported as failed, never waited for."""

    def __init__(self, timeout_s: float = 1.0, concurrency: int = 32) -> None:
        self.timeout_s = timeout_s
        self._limit = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # a fresh connection per scrape: the processes' bare /metrics servers close after each answer
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._session

    async def scrape(self, instances: Iterable[Instance], wanted: frozenset[str]) -> list[Scrape]:
        return list(await asyncio.gather(*(self._one(i, wanted) for i in instances)))

    async def _one(self, inst: Instance, wanted: frozenset[str]) -> Scrape:
        if not inst.metrics:
            return Scrape(inst, error="announces no metrics address")
        async with self._limit:
            try:
                async with self._client().get(f"http://{inst.metrics}/metrics") as r:
                    if r.status != 200:
                        return Scrape(inst, error=f"HTTP {r.status}")
                    body = await r.content.read(MAX_BODY_BYTES + 1)
                    if len(body) > MAX_BODY_BYTES:
                        return Scrape(inst, error=f"/metrics is larger than {MAX_BODY_BYTES} bytes")
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return Scrape(inst, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        try:
            return Scrape(inst, parse(body.decode("utf-8", "replace"), wanted))
        except MetricsTextError as exc:
            return Scrape(inst, error=str(exc))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
