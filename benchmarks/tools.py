"""The load tools: their command lines and pure parsers of what they print.

Nothing here runs a process; `cases.py` runs the commands in the lab and hands the output to
these parsers, which the unit tests feed with recorded output.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class ToolOutputError(ValueError):
    """A tool's output could not be understood (or it reports a failure)."""


# -- iperf3 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IperfResult:
    bits_per_second: float  # as received by the server
    bytes: int
    seconds: float
    retransmits: int | None


def iperf3_cmd(host: str, port: int, seconds: float, streams: int = 1) -> list[str]:
    """A client run with JSON output; `-t` takes whole seconds (at least one)."""
    return [
        "iperf3", "-c", host, "-p", str(port), "-t", str(max(1, round(seconds))),
        "-P", str(streams), "-J",
    ]


def parse_iperf3(text: str) -> IperfResult:
    """The totals of an `iperf3 -J` client run; a run that reports an error raises."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ToolOutputError(f"iperf3 printed no JSON: {text[:200]!r}") from e
    if not isinstance(doc, dict):
        raise ToolOutputError("iperf3 JSON is not an object")
    if doc.get("error"):
        raise ToolOutputError(f"iperf3: {doc['error']}")
    end = doc.get("end") or {}
    received = end.get("sum_received")
    if not isinstance(received, dict) or "bits_per_second" not in received:
        raise ToolOutputError("iperf3 JSON has no end.sum_received")
    sent = end.get("sum_sent") or {}
    return IperfResult(
        bits_per_second=float(received["bits_per_second"]),
        bytes=int(received.get("bytes", 0)),
        seconds=float(received.get("seconds", 0.0)),
        retransmits=int(sent["retransmits"]) if "retransmits" in sent else None,
    )


# -- wrk --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    requests_per_second: float
    latency_ms: dict[int, float] = field(default_factory=dict)  # percentile -> ms
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx


def wrk_cmd(url: str, seconds: float, connections: int, *, threads: int = 1,
            close: bool = False, latency: bool = False, timeout_s: float = 5) -> list[str]:
    """A wrk run; `close` sends `Connection: close` so every request is a new connection."""
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
           "--timeout", f"{timeout_s:g}s"]
    if latency:
        cmd.append("--latency")
    if close:
        cmd += ["-H", "Connection: close"]
    return [*cmd, url]


_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")
_PERCENTILE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s*$")
_SUMMARY = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h)")
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)


def parse_duration_ms(text: str) -> float:
    """wrk's time format (`85.12us`, `1.02ms`, `2.00s`, `1.00m`) in milliseconds."""
    m = _TIME.match(text.strip())
    if not m:
        raise ToolOutputError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _TIME_UNITS_MS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """Totals, the latency distribution (with `--latency`) and the errors wrk reports."""
    summary = next((m for line in text.splitlines() if (m := _SUMMARY.match(line))), None)
    rps = _RPS.search(text)
    if summary is None or rps is None:
        raise ToolOutputError(f"wrk printed no summary: {text[-300:]!r}")
    latency: dict[int, float] = {}
    in_distribution = False
    for line in text.splitlines():
        if line.strip() == "Latency Distribution":
            in_distribution = True
            continue
        if in_distribution:
            m = _PERCENTILE.match(line)
            if not m:
                in_distribution = False
                continue
            latency[round(float(m.group(1)))] = parse_duration_ms(m.group(2))
    errors: dict[str, int] = {}
    if m := _SOCKET_ERRORS.search(text):
        errors = dict(zip(("connect", "read", "write", "timeout"),
                          (int(g) for g in m.groups()), strict=True))
    non_2xx = int(m.group(1)) if (m := _NON_2XX.search(text)) else 0
    return WrkResult(
        requests=int(summary.group(1)),
        seconds=parse_duration_ms(summary.group(2) + summary.group(3)) / 1e3,
        requests_per_second=float(rps.group(1)),
        latency_ms=latency,
        socket_errors=errors,
        non_2xx=non_2xx,
    )


# -- h2load -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class H2loadResult:
    requests_per_second: float
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    seconds: float = 0.0  # the run's duration ("finished in …")

    @property
    def errors(self) -> int:
        # h2load also counts the status of responses that arrive after the end of the run
        return self.failed + self.errored + self.timeout + max(0, self.succeeded - self.status_2xx)


def h2load_cmd(url: str, seconds: float, connections: int, streams: int) -> list[str]:
    """A timed h2load run (HTTP/2 prior knowledge on an http:// URL), one thread."""
    return ["h2load", "-t", "1", "-c", str(connections), "-m", str(streams),
            "-D", str(max(1, round(seconds))), url]


def h2load_rate_cmd(url: str, seconds: float, connections: int, rate: int, log_file: str
                    ) -> list[str]:
    """HTTP/1.1 at a fixed total ``rate`` for about ``seconds``: each of ``connections``
    clients sends ``rate / connections`` requests a second, one at a time, and every request is
    logged to ``log_file`` (h2load appends: give it a new file). The clients start 1/rate
    apart (``--rate 1``), so their requests are spread over each interval, not sent in
    bursts of ``connections`` at once as clients started together would."""
    per_client = max(1, round(rate * seconds / connections))
    period_ms = max(1, round(1000 / rate))  # h2load takes whole units here
    return ["h2load", "--h1", "-t", "1", "-c", str(connections), "-m", "1",
            "-n", str(per_client * connections), "--rps", f"{rate / connections:g}",
            "--rate", "1", "--rate-period", f"{period_ms}ms", "--log-file", log_file, url]


_H2_FINISHED = re.compile(r"^finished in ([0-9.]+\w+), ([0-9.]+) req/s", re.M)
_H2_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout", re.M)
_H2_STATUS = re.compile(r"^status codes: (\d+) 2xx", re.M)


def parse_h2load(text: str) -> H2loadResult:
    """h2load's totals; output without them (it could not connect at all) raises."""
    fin, req = _H2_FINISHED.search(text), _H2_REQUESTS.search(text)
    if fin is None or req is None:
        raise ToolOutputError(f"h2load printed no summary: {text[-300:]!r}")
    status = _H2_STATUS.search(text)
    succeeded = int(req.group(4))
    return H2loadResult(
        requests_per_second=float(fin.group(2)),
        succeeded=succeeded,
        failed=int(req.group(5)),
        errored=int(req.group(6)),
        timeout=int(req.group(7)),
        status_2xx=int(status.group(1)) if status else succeeded,
        seconds=parse_duration_ms(fin.group(1)) / 1e3,
    )


@dataclass(frozen=True)
class RequestLog:
    """h2load's ``--log-file``: the time of each 2xx request, and how many were not 2xx."""

    latencies_ms: list[float]  # sorted
    not_2xx: int

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile (p in 0..100) of the 2xx requests; None without any."""
        v = self.latencies_ms
        if not v:
            return None
        return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def parse_h2load_log(text: str) -> RequestLog:
    """Rows of ``start µs<TAB>status<TAB>µs to the end of the response``."""
    times: list[float] = []
    bad = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        try:
            status, micros = int(cols[1]), int(cols[2])
        except (IndexError, ValueError):
            raise ToolOutputError(f"h2load log line {n} unreadable: {line[:80]!r}") from None
        if 200 <= status < 300 and micros >= 0:
            times.append(micros / 1e3)
        else:
            bad += 1
    times.sort()
    return RequestLog(times, bad)


# -- Prometheus text ----------------------------------------------------------------------------


def prom_sum(text: str, name: str) -> float:
    """The sum of all samples of a metric (every label set) in Prometheus text format."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " "):
            continue  # another metric whose name starts the same
        value = rest.rsplit("}", 1)[-1].split()
        try:
            total += float(value[0])
        except (IndexError, ValueError):
            log.debug("unreadable sample: %r", line)
    return total


# -- /proc ------------------------------------------------------------------------------------


def parse_proc_stat_cpu_ticks(text: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/PID/stat."""
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    close = text.rfind(")")
    if close < 0:
        raise ToolOutputError("not a /proc/PID/stat line")
    fields = text[close + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    try:
        return int(fields[11]) + int(fields[12])
    except (IndexError, ValueError) as e:
        raise ToolOutputError("short /proc/PID/stat line") from e


def parse_status_kb(text: str, key: str = "VmRSS") -> int:
    """A `kB` field (VmRSS, VmHWM, …) of /proc/PID/status."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                return int(parts[0])
    raise ToolOutputError(f"/proc/PID/status has no {key}")


def parse_cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return "unknown"


# -- statistics -------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that were measured; None if none was."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def spread(values: Sequence[float | None]) -> tuple[float, float] | None:
    got = [v for v in values if v is not None]
    return (min(got), max(got)) if got else None
