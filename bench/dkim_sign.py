"""What a DKIM signature costs at accept (postmux.dkim DkimSigner.signatures), per message.

    .venv/bin/python bench/dkim_sign.py [--repeat 5] [--number 200] [--large-mb 50]

Keys made as `postmux dkim genkey` makes them (RSA-2048, Ed25519). For each key alone, and both (dual
signing), at 1.5 KB and 100 KB of 76-octet lines: ms per message, the best of --repeat rounds of --number
messages, in this thread (the accept path runs it in a worker thread). Then a --large-mb message whose text
is a tail in a file (postmux.body), signed once: its time, and the growth of the process's peak RSS
(VmHWM) while signing it: memory stays at one read chunk (256 KiB) whatever the size.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
import timeit
from dataclasses import dataclass
from pathlib import Path

from postmux.body import BodyFile
from postmux.dkim import DkimSigner, PrivateKey, generate_key

LINE = b"x" * 74 + b"\r\n"
HEAD = (
    b"From: App <app@example.test>\r\nTo: user@dest.test\r\nSubject: bench\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@example.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
)


@dataclass(frozen=True)
class Selector:
    name: str
    key: PrivateKey


@dataclass(frozen=True)
class Domain:
    domain: str
    keys: tuple[Selector, ...]
    subdomains: bool = False
    fallback: bool = False
    headers: tuple[str, ...] = ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type")
    oversign: tuple[str, ...] = ("From", "Subject")


def peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--large-mb", type=int, default=50)
    args = parser.parse_args()
    rsa = Selector("rsa", generate_key("rsa-sha256")[1])
    ed = Selector("ed", generate_key("ed25519-sha256")[1])
    signers = {
        "RSA-2048": DkimSigner([Domain("example.test", (rsa,))]),
        "Ed25519": DkimSigner([Domain("example.test", (ed,))]),
        "RSA-2048 + Ed25519": DkimSigner([Domain("example.test", (rsa, ed))]),
    }
    texts = {"1.5 KB": HEAD + LINE * 18, "100 KB": HEAD + LINE * 1316}
    print(f"{'signer':<22}" + "".join(f"{size:>12}" for size in texts) + "   (ms per message)")
    for name, signer in signers.items():
        row = []
        for text in texts.values():
            sign = functools.partial(signer.signatures, text)
            best = min(timeit.repeat(sign, number=args.number, repeat=args.repeat))
            row.append(best / args.number * 1000)
        print(f"{name:<22}" + "".join(f"{ms:>12.3f}" for ms in row))
    large(signers["RSA-2048 + Ed25519"], args.large_mb)


def large(signer: DkimSigner, megabytes: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "tail"
        block = LINE * 13_797  # ~1 MiB
        with open(path, "wb") as f:
            for _ in range(megabytes):
                f.write(block)
        tail = BodyFile(str(path), 0, os.path.getsize(path))
        before = peak_rss_kb()
        started = time.perf_counter()
        fields = signer.signatures(HEAD, tail)
        took = time.perf_counter() - started
        grew = peak_rss_kb() - before
    assert fields.count(b"DKIM-Signature:") == 2
    print(f"{megabytes} MB text in a file, dual signed: {took * 1000:.0f} ms, peak RSS grew {grew} KiB")


if __name__ == "__main__":
    main()
