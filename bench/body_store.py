"""Where a spool should keep message texts: what each way costs the writer, per message (issue 12).

    .venv/bin/python bench/body_store.py [--messages 3000] [--sizes 1500,16384,51200,102400] [--batch 20]

Each way stores N texts of one size in group commits of --batch (as the spool's writer does under load),
each commit durable (WAL, synchronous=FULL; files fdatasync'd before the commit that names them), then
deletes them the way delivery does, and prints msgs/s and the process's user and system CPU a message:

- sqlite_row: the text in its SQLite row (what the spool did before issue 12): written to the WAL, then
  again to the database at checkpoint;
- file_per_message: one file a message, fdatasync'd one after the other (Postfix's queue files), the
  directory synced once per commit;
- file_per_message_20_threads: the same, 20 fsyncs at once (Postfix's many cleanup processes);
- segment_per_commit: the commit's texts appended to one new file, one fdatasync (what spool/bodies.py
  does; it also syncs the directory).

Files go under /tmp (ext4 here; tmpfs would make every fsync free: the script says which it is on).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def database(path: str) -> sqlite3.Connection:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=FULL")
    c.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, data BLOB, ref TEXT)")
    return c


def commit_refs(c: sqlite3.Connection, refs: list[str]) -> None:
    c.execute("BEGIN IMMEDIATE")
    c.executemany("INSERT INTO m (ref) VALUES (?)", [(r,) for r in refs])
    c.execute("COMMIT")


def delete_rows(c: sqlite3.Connection, first: int, last: int) -> None:
    c.execute("BEGIN IMMEDIATE")
    c.execute("DELETE FROM m WHERE id > ? AND id <= ?", (first, last))
    c.execute("COMMIT")


class Run:
    def __init__(self, messages: int, batch: int, text: bytes) -> None:
        self.n, self.batch, self.text = messages, batch, text

    def sqlite_row(self, d: str) -> None:
        c = database(f"{d}/s.db")
        for _ in range(0, self.n, self.batch):
            c.execute("BEGIN IMMEDIATE")
            c.executemany("INSERT INTO m (data) VALUES (?)", [(self.text,)] * self.batch)
            c.execute("COMMIT")
        for i in range(0, self.n, self.batch):
            delete_rows(c, i, i + self.batch)

    def _write(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, self.text)
        os.fdatasync(fd)
        os.close(fd)

    def _files(self, d: str, write_all: Callable[[list[str]], object]) -> None:
        c = database(f"{d}/s.db")
        os.mkdir(f"{d}/b")
        dfd = os.open(f"{d}/b", os.O_RDONLY)
        for i in range(0, self.n, self.batch):
            names = [f"{d}/b/{i + j}" for j in range(self.batch)]
            write_all(names)
            os.fsync(dfd)
            commit_refs(c, names)
        for i in range(0, self.n, self.batch):
            for j in range(self.batch):
                os.unlink(f"{d}/b/{i + j}")
            delete_rows(c, i, i + self.batch)
        os.close(dfd)

    def file_per_message(self, d: str) -> None:
        self._files(d, lambda names: [self._write(p) for p in names])

    def file_per_message_20_threads(self, d: str) -> None:
        with ThreadPoolExecutor(20) as pool:
            self._files(d, lambda names: list(pool.map(self._write, names)))

    def segment_per_commit(self, d: str) -> None:
        c = database(f"{d}/s.db")
        os.mkdir(f"{d}/b")
        dfd = os.open(f"{d}/b", os.O_RDONLY)
        for i in range(0, self.n, self.batch):
            fd = os.open(f"{d}/b/{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            for _ in range(self.batch):
                os.write(fd, self.text)
            os.fdatasync(fd)
            os.close(fd)
            os.fsync(dfd)
            commit_refs(c, [str(i)] * self.batch)
        for i in range(0, self.n, self.batch):
            os.unlink(f"{d}/b/{i}")
            delete_rows(c, i, i + self.batch)
        os.close(dfd)


WAYS = ("sqlite_row", "file_per_message", "file_per_message_20_threads", "segment_per_commit")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--sizes", default="1500,16384,51200,102400")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--ways", default=",".join(WAYS))
    a = p.parse_args()
    fs = subprocess.run(["df", "--output=fstype", "/tmp"], capture_output=True, text=True, check=False)
    print(f"files under /tmp ({fs.stdout.split()[-1] if fs.stdout else '?'}), commits of {a.batch}")
    print("| size | way | msgs/s | CPU ms/msg (user + sys) |\n|---:|---|---:|---|")
    for size in (int(s) for s in a.sizes.split(",")):
        run = Run(a.messages - a.messages % a.batch, a.batch, os.urandom(size))
        for way in a.ways.split(","):
            d = tempfile.mkdtemp(prefix="postmux-bodies-", dir="/tmp")
            try:
                (u0, s0), t0 = cpu(), time.perf_counter()
                getattr(run, way)(d)
                elapsed, (u1, s1) = time.perf_counter() - t0, cpu()
            finally:
                shutil.rmtree(d)
            per = 1000 / run.n
            print(
                f"| {size} | {way} | {run.n / elapsed:,.0f} | "
                f"{(u1 - u0 + s1 - s0) * per:.3f} ({(u1 - u0) * per:.3f} + {(s1 - s0) * per:.3f}) |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
