"""The proxies' logging (nodeproxy.telemetry.logs): access-log lines written in batches, in
order, the same text as a plain handler, none lost on a clean exit — for the gateway and the
node proxy alike."""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
from pathlib import Path

import trio

from nodeproxy.telemetry.logs import (
    LOG_FORMAT,
    BufferedHandler,
    LineFormatter,
    flush_logs_periodically,
)
from tests.pki import make_pki


def _records(n: int, level: int = logging.INFO) -> list[logging.LogRecord]:
    return [logging.LogRecord("nodeproxy.access", level, __file__, 0, "line %d", (i,), None)
            for i in range(n)]


def test_buffered_log_handler_writes_the_same_text_in_batches():
    plain_out, buffered_out = io.StringIO(), io.StringIO()
    plain = logging.StreamHandler(plain_out)
    buffered = BufferedHandler(buffered_out, max_lines=3, interval=3600)
    for h in (plain, buffered):
        h.setFormatter(LineFormatter(LOG_FORMAT))
    records = _records(4)
    for r in records[:2]:
        plain.handle(r)
        buffered.handle(r)
    assert buffered_out.getvalue() == "" and buffered.pending == 2  # held back
    plain.handle(records[2])
    buffered.handle(records[2])  # the third line: a batch, written at once
    assert buffered_out.getvalue() == plain_out.getvalue() and buffered.pending == 0
    plain.handle(records[3])
    buffered.handle(records[3])
    warning = _records(1, logging.WARNING)[0]
    plain.handle(warning)
    buffered.handle(warning)  # a warning goes out at once, after what was waiting
    assert buffered_out.getvalue() == plain_out.getvalue()
    assert buffered_out.getvalue().splitlines()[-1].endswith("WARNING nodeproxy.access: line 0")
    buffered.handle(records[0])
    buffered.close()  # closing writes the rest
    assert buffered_out.getvalue().endswith("INFO nodeproxy.access: line 0\n")


async def test_buffered_log_lines_are_written_within_the_interval():
    out = io.StringIO()
    handler = BufferedHandler(out, max_lines=1000, interval=0.05)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(flush_logs_periodically, 0.05)
            handler.handle(_records(1)[0])
            with trio.fail_after(5):  # a quiet process still writes its last line
                while not out.getvalue():
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()
    finally:
        root.removeHandler(handler)
    assert out.getvalue() == "line 0\n"


def test_a_clean_exit_writes_every_buffered_line():
    script = (
        "import logging, sys\n"
        "from nodeproxy.telemetry.logs import configure_logging\n"
        "configure_logging(stream=sys.stdout)\n"
        "log = logging.getLogger('nodeproxy.access')\n"
        "for i in range(10):\n"
        "    log.info('line %d', i)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=str(Path(__file__).parents[2]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split(": ", 1)[1] for ln in lines] == [f"line {i}" for i in range(10)]
    assert all(" INFO nodeproxy.access: " in ln for ln in lines)




def _stop_after(argv: list[str], marker: str) -> tuple[int, str]:
    """Run a proxy process until ``marker`` is in its log, SIGTERM it (as the lab and kubelet
    stop it); its exit code and what it logged after the marker."""
    proc = subprocess.Popen([sys.executable, "-m", "nodeproxy.cli", *argv],
                            stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).parents[2]))
    try:
        seen = ""
        while marker not in seen:
            line = proc.stderr.readline()
            assert line, f"{argv[0]} exited early ({proc.wait()}): {seen}"
            seen += line
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, rest


def _credentials(tmp_path: Path) -> list[str]:
    (tmp_path / "root.pem").write_bytes(make_pki().root_pem)
    (tmp_path / "token").write_text("t\n")
    return ["--controlplane", "127.0.0.1:9", "--ca-root", str(tmp_path / "root.pem"),
            "--token-file", str(tmp_path / "token")]


def test_gateway_stopped_by_sigterm_exits_cleanly_and_keeps_the_log(tmp_path):
    """The gateway process stopped by SIGTERM exits 0 and writes every line it logged (its
    "serving" line, too, comes out within the flush interval)."""
    code, rest = _stop_after(
        ["gateway", "--namespace", "shop", *_credentials(tmp_path), "--listen", "127.0.0.1:0",
         "--metrics", "127.0.0.1:0", "--ready", "127.0.0.1:0"], "serving HBONE")
    assert code == 0, rest
    assert "gateway stopping (signal 15)" in rest


def test_node_proxy_stopped_by_sigterm_writes_its_last_lines(tmp_path):
    """The node proxy logs through the buffered handler too: what it logged up to its exit
    (INFO lines, held back for up to 100 ms) is all there after a SIGTERM."""
    code, rest = _stop_after(
        ["ztunnel", "--node", "n1", *_credentials(tmp_path), "--agent-socket",
         str(tmp_path / "agent"), "--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
         "--ready", "127.0.0.1:0", "--drain-seconds", "0"], "(/healthz/ready)")
    assert code == 0, rest
    lines = rest.splitlines()
    assert any("INFO ztunnel.proxy: signal SIGTERM: shutting down" in ln for ln in lines)
    assert lines[-1].endswith("INFO ztunnel.proxy: drained (0 connections left)"), rest
