"""postmux against Postfix, side by side in one run, on the same sinks and the same load (issue 6).

    .venv/bin/python bench/vs_postfix.py [--messages N] [--sessions S] [--sizes 1500,51200,102400] [--pairs P]

Three `smtp-sink -c` upstreams count what they receive. For each message size, P pairs of runs alternate
postmux (A) and a private Postfix instance (B); each run injects N messages with `smtp-source` over S
sessions (a new connection per message) while a probe client sends one message every --probe-interval
seconds and times DATA to 250 (smtp-source reports no latency). Per run: accepted msgs/s (N over
smtp-source's wall time), end-to-end msgs/s (N over the time from the start of injection until the sinks
have counted every message, the probe's included), p50/p99 accept latency, peak RSS (postmux's one
process; the sum over Postfix's processes, sampled), CPU ms a message (counted from the start of
injection: start-up is not a message's), and per pair the ratio postmux / Postfix, with the median of the
pairs. The result also goes to bench/out/vs-postfix-*.json.

postmux: `postmux serve`, round_robin over the three sinks, spool and events on disk, fsync on
(synchronous=FULL), group commit. Postfix: its own config, queue and data directories under the run's
temporary directory, smtpd on 127.0.0.1 only (no port 25), relaying to `[127.0.0.1]:PORT` of the first
sink (a literal address: no DNS, no /etc/hosts), queue on disk; started and stopped with
`postfix -c DIR start|stop`. Postfix is installed with apt if missing (no daemon starts: policy-rc.d).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiosmtplib
import dkim
from throughput import (
    BenchError,
    Timed,
    apt_install,
    cpu_seconds,
    delivery_results,
    ensure_tools,
    find_tool,
    finish_report,
    free_port,
    install_postfix,
    peak_rss_mb,
    pick_base_dir,
    postmux_python,
    received_total,
    run_main,
    running_postmux,
    scrape,
    source_command,
    stop_process,
    wait_for_port,
    write_config,
)

from postmux.dkim import DEFAULT_HEADERS, DEFAULT_OVERSIGN, generate_key

SYSTEMS = ("postmux", "postfix")
SINK_COUNT = 3
SINK_BACKLOG = "1000"
POSTFIX_START_TIMEOUT_S = 60.0
POSTFIX_STOP_TIMEOUT_S = 60.0
SAMPLE_INTERVAL_S = 0.2
PROBE_MAX = 5000  # the probe is bounded in count as well as in time
QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


@dataclass(frozen=True)
class Options:
    messages: int
    sessions: int
    sizes: tuple[int, ...]
    pairs: int
    probe_interval_s: float
    delivery_timeout_s: float
    keep: bool
    workers: int = 0
    dkim: bool = False


@dataclass
class Run(Timed):
    system: str
    size: int
    pair: int
    messages: int
    probes: int
    accepted_s: float
    end_to_end_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    peak_rss_mb: float
    peak_pss_mb: float
    cpu_ms_per_msg: float
    load_before: float
    problems: list[str] = field(default_factory=list)


# -- sinks that count ------------------------------------------------------------------------------------


@dataclass
class Sink:
    port: int
    proc: subprocess.Popen[bytes]
    counters: Path

    def messages(self) -> int:
        """The last `mesg=N` that `smtp-sink -c` wrote (it rewrites one line with \\r after each event)."""
        with self.counters.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256))
            tail = f.read().decode(errors="replace")
        for record in reversed(tail.replace("\n", "\r").split("\r")):
            for word in record.split():
                if word.startswith("mesg="):
                    return int(word[5:])
        return 0


@contextlib.contextmanager
def counting_sinks(sink_tool: str, workdir: Path) -> Iterator[list[Sink]]:
    sinks: list[Sink] = []
    try:
        for i in range(SINK_COUNT):
            port = free_port()
            counters = workdir / f"sink-{i + 1}.counters"
            with counters.open("wb") as out:
                # -c: counters on stdout after every session and message (costs the sink 7-15%, peers.md).
                cmd = [sink_tool, "-u", "nobody", "-c", f"127.0.0.1:{port}", SINK_BACKLOG]
                proc = subprocess.Popen(cmd, stdout=out)
            sinks.append(Sink(port, proc, counters))
            wait_for_port(port, proc)
        yield sinks
    finally:
        for sink in sinks:
            stop_process(sink.proc, 10.0)


def sink_total(sinks: Sequence[Sink]) -> int:
    return sum(s.messages() for s in sinks)


# -- process accounting ----------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB; PSS shares shared pages out among the processes that map them."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass  # the process ended between listing and reading
    return rss, pss


class MemorySampler:
    """Samples the summed RSS and PSS of a set of processes (re-listed each time) until stopped."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._stop = threading.Event()
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            for pid in self._pids():
                r, p = memory_kb(pid)
                rss, pss = rss + r, pss + p
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self._stop.wait(SAMPLE_INTERVAL_S)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def tree_cpu_seconds(master: int) -> float:
    """CPU of a master and its workers: its own, its reaped children's (cutime, cstime), the live ones'."""
    fields = Path(f"/proc/{master}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    total = ticks / os.sysconf("SC_CLK_TCK")
    return total + sum(cpu_seconds(pid) for pid in children_of(master) if Path(f"/proc/{pid}").exists())


# -- the systems under test ------------------------------------------------------------------------------


@dataclass
class Target:
    """What a run needs from a system: where to send, whose memory and CPU to count, and its checks."""

    port: int
    pids: Callable[[], list[int]]
    cpu_s: Callable[[], float]
    check: Callable[[int], list[str]]


# -- DKIM signing in both (--dkim) -----------------------------------------------------------------------

# smtp-source writes `From: <bench@example.com>` and the probe `From: probe@example.com`: both systems sign
# d=example.com with the same RSA-2048 key, relaxed/relaxed, the same header fields (postmux's defaults).
DKIM_DOMAIN = "example.com"
DKIM_SELECTOR = "bench"


@dataclass(frozen=True)
class Signing:
    key_file: Path
    record: str  # the TXT record at bench._domainkey.example.com, for checking what arrives


def make_signing(base: Path) -> Signing:
    pem, key = generate_key("rsa-sha256", 2048)
    path = base / "dkim-bench.key"
    path.write_bytes(pem)
    path.chmod(0o600)  # OpenDKIM refuses a key others can read, unless told not to care
    return Signing(path, key.record())


def postmux_dkim_block(signing: Signing) -> str:
    return f"""
[[dkim]]
domain = "{DKIM_DOMAIN}"
selectors = [{{ name = "{DKIM_SELECTOR}", algorithm = "rsa-sha256", key_file = "{signing.key_file}" }}]
"""


OPENDKIM_CONF = """\
# A private OpenDKIM for bench/vs_postfix.py --dkim: a signing milter for the private Postfix, on loopback.
Syslog no
Mode s
Domain {domain}
Selector {selector}
KeyFile {key_file}
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
SignHeaders {headers}
OversignHeaders {oversign}
Socket inet:{port}@127.0.0.1
PidFile {workdir}/opendkim.pid
Background no
RequireSafeKeys false
# Signing asks DNS nothing; should anything try, it asks loopback, never the machine's resolver.
Nameservers 127.0.0.1
"""


@contextlib.contextmanager
def running_opendkim(workdir: Path, signing: Signing) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    conf = workdir / "opendkim.conf"
    conf.write_text(
        OPENDKIM_CONF.format(
            domain=DKIM_DOMAIN,
            selector=DKIM_SELECTOR,
            key_file=signing.key_file,
            headers=",".join(DEFAULT_HEADERS),
            oversign=",".join(DEFAULT_OVERSIGN),
            port=port,
            workdir=workdir,
        )
    )
    with (workdir / "opendkim.log").open("wb") as log:
        proc = subprocess.Popen(["opendkim", "-x", str(conf), "-f"], stdout=log, stderr=log)
    try:
        wait_for_port(port, proc)
        yield port, proc
    finally:
        stop_process(proc, 10.0)


def check_signature(text: bytes, signing: Signing) -> str | None:
    """Why a delivered message's DKIM-Signature does not verify (against the bench's key), or None."""
    text = text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # smtp-sink -d writes lines ended by LF
    if b"\r\nDKIM-Signature:" not in b"\r\n" + text.split(b"\r\n\r\n", 1)[0]:
        return "no DKIM-Signature field"
    record = signing.record.encode()
    if not dkim.verify(text, dnsfunc=lambda name, timeout=5: record):
        return "the DKIM-Signature does not verify"
    return None


@contextlib.contextmanager
def postmux_target(
    workdir: Path, sinks: Sequence[Sink], workers: int = 0, signing: Signing | None = None
) -> Iterator[Target]:
    config = write_config(workdir, True, [s.port for s in sinks], workers)
    if signing is not None:
        config.write_text(config.read_text() + postmux_dkim_block(signing))
    with running_postmux(config, workdir / "postmux.log") as (proc, smtp_port, http_port):

        def check(expected: int) -> list[str]:
            text = scrape(http_port)
            results = delivery_results(text)
            problems = []
            if received_total(text) != expected:
                problems.append(f"postmux received {received_total(text)} != {expected}")
            delivered = int(results.pop("delivered", 0.0))
            if delivered != expected:
                problems.append(f"postmux delivered {delivered} != {expected}")
            if any(results.values()):
                problems.append(f"postmux other delivery results {results}")
            return problems

        # With [smtp] workers, the ingress processes are children of postmux serve: count them too.
        yield Target(
            smtp_port, lambda: [proc.pid, *children_of(proc.pid)], lambda: tree_cpu_seconds(proc.pid), check
        )


MASTER_CF = """\
# A private Postfix for bench/vs_postfix.py: smtpd on loopback only, nothing chrooted, no local delivery.
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n -  0 cleanup
qmgr       unix  n - n 300 1 qmgr
rewrite    unix  - - n -  - trivial-rewrite
bounce     unix  - - n -  0 bounce
defer      unix  - - n -  0 bounce
trace      unix  - - n -  0 bounce
verify     unix  - - n -  1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -  - proxymap
proxywrite unix  - - n -  1 proxymap
smtp       unix  - - n -  - smtp
relay      unix  - - n -  - smtp
showq      unix  n - n -  - showq
error      unix  - - n -  - error
retry      unix  - - n -  - error
discard    unix  - - n -  - discard
anvil      unix  - - n -  1 anvil
scache     unix  - - n -  1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
# A private Postfix for bench/vs_postfix.py (see /work/shared/notes/peers.md).
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
mail_owner = postfix
setgid_group = postdrop
maillog_file = {maillog}
maillog_file_prefixes = {workdir}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 no local delivery in the bench
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
# A literal address in brackets: no MX lookup; DNS off and native lookups: the resolver is never asked.
relayhost = [127.0.0.1]:{relay_port}
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_tls_security_level = none
smtp_tls_security_level = none
biff = no
append_dot_mydomain = no
"""


def postfix_cmd(conf: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["postfix", "-c", str(conf), *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


def master_pid(queue: Path) -> int | None:
    try:
        return int((queue / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def queued_files(queue: Path) -> int:
    return sum(1 for d in QUEUE_SUBDIRS for p in (queue / d).rglob("*") if p.is_file())


def write_postfix_config(workdir: Path, port: int, relay_port: int, milter: int = 0) -> tuple[Path, Path]:
    conf, queue, data = workdir / "postfix-etc", workdir / "postfix-queue", workdir / "postfix-data"
    workdir.chmod(0o755)  # mkdtemp makes it 0700: Postfix's unprivileged daemons must reach their data
    for d in (conf, queue, data):
        d.mkdir()
    shutil.chown(data, "postfix", "postfix")
    maillog = workdir / "postfix.log"
    main_cf = MAIN_CF.format(queue=queue, data=data, maillog=maillog, workdir=workdir, relay_port=relay_port)
    if milter:
        # A milter that cannot answer holds the mail back (4xx), never lets it through unsigned.
        main_cf += f"smtpd_milters = inet:127.0.0.1:{milter}\nmilter_default_action = tempfail\n"
    (conf / "main.cf").write_text(main_cf)
    (conf / "master.cf").write_text(MASTER_CF.format(port=port))
    return conf, queue


def wait_postfix_ready(conf: Path, queue: Path, port: int) -> int:
    deadline = time.monotonic() + POSTFIX_START_TIMEOUT_S
    while time.monotonic() < deadline:
        pid = master_pid(queue)
        if pid is not None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return pid
            except OSError:
                pass
        time.sleep(0.1)
    raise BenchError(f"private Postfix ({conf}) not listening on {port} after {POSTFIX_START_TIMEOUT_S:.0f}s")


def stop_postfix(conf: Path, pid: int | None) -> None:
    """`postfix -c DIR stop`, then wait (bounded) for that master to go; SIGKILL its own PID if it stays."""
    done = postfix_cmd(conf, "stop", timeout_s=POSTFIX_STOP_TIMEOUT_S)
    if done.returncode != 0:
        print(f"postfix stop: {done.stderr.strip()}", file=sys.stderr)
    if pid is None:
        return
    deadline = time.monotonic() + POSTFIX_STOP_TIMEOUT_S
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        print(f"postfix master {pid} still running after stop: SIGKILL", file=sys.stderr)
        os.kill(pid, 9)


@contextlib.contextmanager
def postfix_target(workdir: Path, sinks: Sequence[Sink], signing: Signing | None = None) -> Iterator[Target]:
    if signing is None:
        with postfix_alone(workdir, sinks) as target:
            yield target
        return
    # Postfix signs through OpenDKIM's milter: count OpenDKIM's CPU and memory as Postfix's.
    with contextlib.ExitStack() as stack:
        milter, opendkim = stack.enter_context(running_opendkim(workdir, signing))
        target = stack.enter_context(postfix_alone(workdir, sinks, milter))
        yield Target(
            target.port,
            lambda: [*target.pids(), opendkim.pid],
            lambda: target.cpu_s() + cpu_seconds(opendkim.pid),
            target.check,
        )


@contextlib.contextmanager
def postfix_alone(workdir: Path, sinks: Sequence[Sink], milter: int = 0) -> Iterator[Target]:
    port = free_port()
    conf, queue = write_postfix_config(workdir, port, sinks[0].port, milter)
    started = postfix_cmd(conf, "start", timeout_s=POSTFIX_START_TIMEOUT_S)
    if started.returncode != 0:
        # postfix(1) writes its reasons to stderr only when that is a terminal: say how to see them.
        why = started.stderr.strip() or started.stdout.strip() or "run the same command in a terminal"
        raise BenchError(f"postfix -c {conf} start failed: {why}")
    pid: int | None = None
    try:
        pid = wait_postfix_ready(conf, queue, port)
        master = pid

        def check(expected: int) -> list[str]:
            left = queued_files(queue)
            return [f"postfix still has {left} queue files"] if left else []

        yield Target(port, lambda: [master, *children_of(master)], lambda: tree_cpu_seconds(master), check)
    finally:
        stop_postfix(conf, pid if pid is not None else master_pid(queue))


# -- load and latency ------------------------------------------------------------------------------------


def probe_message(size: int, n: int) -> bytes:
    head = f"From: probe@example.com\r\nTo: user@dest.test\r\nSubject: probe {n}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def probe_once(port: int, size: int, n: int) -> float:
    """Seconds from the DATA command to the 250 after the final dot (includes the relay's fsync)."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, local_hostname="probe.bench.test", start_tls=False, timeout=60
    )
    await client.connect()
    try:
        await client.ehlo()
        await client.mail("probe@example.com")
        await client.rcpt("user@dest.test")
        start = time.perf_counter()
        await client.data(probe_message(size, n))
        return time.perf_counter() - start
    finally:
        await client.quit()


async def probe_while(running: Callable[[], bool], port: int, size: int, interval_s: float) -> list[float]:
    """One message at a time, every interval_s, while the load runs; bounded by PROBE_MAX."""
    latencies: list[float] = []
    while running() and len(latencies) < PROBE_MAX:
        started = time.monotonic()
        latencies.append(await probe_once(port, size, len(latencies)))
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    return latencies


def inject_with_probe(source: str, port: int, opts: Options, size: int) -> tuple[float, list[float]]:
    cmd = source_command(source, port, opts.sessions, opts.messages, size)
    timeout_s = max(120.0, opts.messages / 20.0)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        latencies = asyncio.run(probe_while(lambda: proc.poll() is None, port, size, opts.probe_interval_s))
        _, err = proc.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        stop_process(proc, 5.0)
        raise BenchError(f"smtp-source did not finish {opts.messages} messages in {timeout_s:.0f}s") from None
    finally:
        if proc.poll() is None:
            stop_process(proc, 5.0)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        why = err.decode(errors="replace").strip()
        raise BenchError(f"smtp-source exited {proc.returncode} (a message was refused): {why}")
    return elapsed, latencies


def wait_sinks(sinks: Sequence[Sink], target: int, start: float, timeout_s: float) -> float:
    deadline = start + timeout_s
    while time.monotonic() < deadline:
        if sink_total(sinks) >= target:
            return time.monotonic() - start
        time.sleep(0.05)
    seen = sink_total(sinks)
    raise BenchError(f"{timeout_s:.0f}s after injection started the sinks had {seen} of {target}")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- one run ---------------------------------------------------------------------------------------------


def target_of(
    system: str, workdir: Path, sinks: Sequence[Sink], opts: Options, signing: Signing | None
) -> contextlib.AbstractContextManager[Target]:
    if system == "postmux":
        return postmux_target(workdir, sinks, opts.workers, signing)
    return postfix_target(workdir, sinks, signing)


def check_signing(system: str, opts: Options, sink_tool: str, signing: Signing) -> None:
    """Before the timed runs: one message through the system into a sink that keeps it, whose signature
    must verify. A bench of signers that do not sign would measure nothing."""
    base, _ = pick_base_dir()
    workdir = Path(tempfile.mkdtemp(prefix=f"vs-postfix-dkim-{system}-", dir=base))
    try:
        workdir.chmod(0o755)  # the sink writes as nobody
        kept = workdir / "kept"
        kept.mkdir()
        shutil.chown(kept, "nobody")
        port, counters = free_port(), workdir / "sink.counters"
        with counters.open("wb") as out:
            cmd = [sink_tool, "-u", "nobody", "-c", "-d", f"{kept}/%M.", f"127.0.0.1:{port}", SINK_BACKLOG]
            proc = subprocess.Popen(cmd, stdout=out)
        sink = Sink(port, proc, counters)
        try:
            wait_for_port(port, proc)
            with target_of(system, workdir, [sink], opts, signing) as target:
                asyncio.run(probe_once(target.port, 1500, 0))
                wait_sinks([sink], 1, time.monotonic(), 60.0)
        finally:
            stop_process(proc, 10.0)
        texts = [f.read_bytes() for f in kept.iterdir()]
        why = check_signature(texts[0], signing) if texts else "the sink kept no message"
        if why:
            raise BenchError(f"{system} with --dkim: {why} (kept in {workdir})")
        print(f"{system}: the DKIM-Signature verifies", file=sys.stderr)
    except BaseException:
        opts = Options(**{**asdict(opts), "keep": True})
        raise
    finally:
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_once(
    system: str,
    size: int,
    pair: int,
    opts: Options,
    source: str,
    sinks: Sequence[Sink],
    signing: Signing | None = None,
) -> Run:
    base, _ = pick_base_dir()
    load = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix=f"vs-postfix-{system}-", dir=base))
    try:
        with target_of(system, workdir, sinks, opts, signing) as target:
            before = sink_total(sinks)
            with MemorySampler(target.pids) as memory:
                cpu_before = target.cpu_s()  # start-up (imports, Postfix's daemons) is not a message's
                start = time.monotonic()
                accepted_s, latencies = inject_with_probe(source, target.port, opts, size)
                expected = opts.messages + len(latencies)
                end_to_end_s = wait_sinks(sinks, before + expected, start, opts.delivery_timeout_s)
                time.sleep(0.5)  # duplicates would show up now
            cpu_s = target.cpu_s() - cpu_before
            problems = target.check(expected)
            rss = peak_rss_mb(target.pids()[0]) if system == "postmux" else memory.peak_rss_kb / 1024
        extra = sink_total(sinks) - before - expected
        if extra:
            problems.append(f"{system}: the sinks got {extra} more messages than were sent (duplicates)")
        return Run(
            system=system,
            size=size,
            pair=pair,
            messages=opts.messages,
            probes=len(latencies),
            accepted_s=accepted_s,
            end_to_end_s=end_to_end_s,
            latency_p50_ms=1000 * percentile(latencies, 0.50),
            latency_p99_ms=1000 * percentile(latencies, 0.99),
            peak_rss_mb=max(rss, memory.peak_rss_kb / 1024),
            peak_pss_mb=memory.peak_pss_kb / 1024,
            cpu_ms_per_msg=1000 * cpu_s / expected,
            load_before=load,
            problems=problems,
        )
    finally:
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# -- reporting -------------------------------------------------------------------------------------------

COLUMNS = (
    ("accepted msgs/s", lambda r: r.accepted_rate, "{:.0f}"),
    ("end-to-end msgs/s", lambda r: r.end_to_end_rate, "{:.0f}"),
    ("accept p50 ms", lambda r: r.latency_p50_ms, "{:.1f}"),
    ("accept p99 ms", lambda r: r.latency_p99_ms, "{:.1f}"),
    ("peak RSS MB", lambda r: r.peak_rss_mb, "{:.1f}"),
    ("peak PSS MB", lambda r: r.peak_pss_mb, "{:.1f}"),
    ("CPU ms/msg", lambda r: r.cpu_ms_per_msg, "{:.2f}"),
)


def pair_ratios(runs: Sequence[Run], size: int) -> list[list[float]]:
    """Per pair, postmux / Postfix for every column."""
    out = []
    pairs = sorted({r.pair for r in runs if r.size == size})
    for p in pairs:
        a = next(r for r in runs if r.size == size and r.pair == p and r.system == "postmux")
        b = next(r for r in runs if r.size == size and r.pair == p and r.system == "postfix")
        out.append([get(a) / get(b) if get(b) else float("nan") for _, get, _ in COLUMNS])
    return out


def print_tables(runs: Sequence[Run], sizes: Sequence[int]) -> dict[str, list[float]]:
    medians: dict[str, list[float]] = {}
    for size in sizes:
        print(f"\n### {size} B messages\n")
        print("| run | system | " + " | ".join(t for t, _, _ in COLUMNS) + " |")
        print("|---|---|" + "---:|" * len(COLUMNS))
        for r in (r for r in runs if r.size == size):
            cells = [fmt.format(get(r)) for _, get, fmt in COLUMNS]
            print(f"| {r.pair} | {r.system} | " + " | ".join(cells) + " |")
        ratios = pair_ratios(runs, size)
        for p, row in enumerate(ratios, 1):
            print(f"| {p} | ratio postmux / Postfix | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        med = [statistics.median(col) for col in zip(*ratios, strict=True)]
        medians[str(size)] = med
        print("| | **median ratio** | " + " | ".join(f"**{v:.2f}**" for v in med) + " |")
    return medians


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=10_000, help="smtp-source messages per run (10000)")
    p.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions (20)")
    p.add_argument("--sizes", default="1500,51200,102400", help="message sizes in bytes, comma-separated")
    p.add_argument("--pairs", type=int, default=2, help="A B pairs per size (2)")
    p.add_argument("--probe-interval", type=float, default=0.05, help="seconds between probe messages")
    p.add_argument("--delivery-timeout", type=float, default=600.0, help="seconds per run (600)")
    p.add_argument("--keep", action="store_true", help="keep each run's directory (configs, logs, queues)")
    p.add_argument("--workers", type=int, default=0, help="postmux's [smtp] workers (ingress processes)")
    p.add_argument(
        "--dkim",
        action="store_true",
        help="both sign RSA-2048: postmux's [[dkim]], Postfix with OpenDKIM's milter (installed if missing)",
    )
    a = p.parse_args(argv)
    sizes = tuple(int(s) for s in a.sizes.split(",") if s.strip())
    if min(a.messages, a.sessions, a.pairs, *sizes) < 1 or a.probe_interval <= 0:
        p.error("--messages, --sessions, --pairs, --sizes and --probe-interval must be positive")
    return Options(
        a.messages,
        a.sessions,
        sizes,
        a.pairs,
        a.probe_interval,
        a.delivery_timeout,
        a.keep,
        a.workers,
        a.dkim,
    )


def ensure_postfix() -> tuple[str, str]:
    source, sink = ensure_tools()
    if find_tool("postfix") is None:
        install_postfix()
    if find_tool("postfix") is None:
        raise BenchError("postfix installed but the postfix command is still not found")
    return source, sink


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    source, sink_tool = ensure_postfix()
    base, kind = pick_base_dir()
    print(f"spool and queues under {base} (filesystem {kind})", file=sys.stderr)
    print(f"postmux runs on Python {postmux_python()}", file=sys.stderr)
    signing = None
    if opts.dkim:
        if find_tool("opendkim") is None:
            apt_install("opendkim")
        signing = make_signing(base)
        for system in SYSTEMS:
            check_signing(system, opts, sink_tool, signing)
    runs: list[Run] = []
    sinkdir = Path(tempfile.mkdtemp(prefix="vs-postfix-sinks-", dir=base))
    try:
        with counting_sinks(sink_tool, sinkdir) as sinks:
            for size in opts.sizes:
                for pair in range(1, opts.pairs + 1):
                    for system in SYSTEMS:
                        print(f"[{size} B, pair {pair}] {system} ...", file=sys.stderr, flush=True)
                        r = run_once(system, size, pair, opts, source, sinks, signing)
                        print(
                            f"    accepted {r.accepted_rate:.0f}/s, end to end {r.end_to_end_rate:.0f}/s,"
                            f" p50/p99 {r.latency_p50_ms:.1f}/{r.latency_p99_ms:.1f} ms ({r.probes} probes),"
                            f" RSS {r.peak_rss_mb:.1f} MB, CPU {r.cpu_ms_per_msg:.2f} ms/msg,"
                            f" load before {r.load_before:.2f}",
                            file=sys.stderr,
                            flush=True,
                        )
                        runs.append(r)
    finally:
        shutil.rmtree(sinkdir, ignore_errors=True)
        if signing is not None:
            signing.key_file.unlink(missing_ok=True)
    medians = print_tables(runs, opts.sizes)
    problems = [p for r in runs for p in r.problems]
    return finish_report(
        "vs-postfix",
        opts,
        runs,
        problems,
        filesystem=kind,
        postfix=subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip(),
        columns=[t for t, _, _ in COLUMNS],
        median_ratio_postmux_over_postfix=medians,
    )


if __name__ == "__main__":
    run_main(main)
