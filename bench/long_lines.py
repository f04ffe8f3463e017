"""What folding long text lines costs the DATA reader (ingress/data.py DataText), per message.

    .venv/bin/python bench/long_lines.py [--repeat 7] [--number 200] [--baseline /work/main/src]

A message is fed to a DataText in 64 KiB blocks, as BlockDataSMTP reads it, and its text taken, the best of
--repeat rounds of --number messages. Messages: 1.5 KB and 50 KB of 76-octet lines (no long line), 50 KB
with one 5,000-octet HTML line, 50 KB on one line, and 100 KB of smtp-source's 80-octet lines (the load of
bench/vs_postfix). Readers: `refuse` ([smtp] long_lines = "refuse"), `fold` (the default), and with
--baseline the DataText of another checkout.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postmux.ingress.data import BLOCK, DataText

LINE = b"x" * 74 + b"\r\n"
HEAD = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: bench\r\n\r\n"
# What smtp-source sends (bench/vs_postfix's load): dots in the header's addresses and Message-Id, none after.
SOURCE_HEAD = b"From: <bench@example.com>\r\nTo: <user@dest.test>\r\nMessage-Id: <2515.0003.0000@vm>\r\n\r\n"


def messages() -> dict[str, bytes]:
    html = b"<p>" + b"word " * 1000 + b"</p>\r\n"  # 5,009 octets on one line
    return {
        "1.5 KB, short lines": HEAD + LINE * 19,
        "50 KB, short lines": HEAD + LINE * 657,
        "50 KB, one 5 KB line": HEAD + LINE * 591 + html,
        "50 KB on one line": HEAD + b"y " * 25_000 + b"\r\n",
        "100 KB, smtp-source's shape": SOURCE_HEAD
        + b"".join(b"%dX" % (i % 10) + b"X" * 77 + b"\r\n" for i in range(1264)),
    }


def reader(cls: Any, **kwargs: Any) -> Callable[[bytes], bytes]:
    def read(message: bytes) -> bytes:
        stream = message + b".\r\n"
        text = cls(30_000_000, 1001, **kwargs)
        for at in range(0, len(stream), BLOCK):
            text.feed(stream[at : at + BLOCK])
        assert text.done and text.refusal is None
        content: bytes = text.content
        return content

    return read


def baseline(src: Path) -> Any:
    """DataText from another checkout's src/postmux/ingress/data.py, loaded under a name of its own."""
    spec = importlib.util.spec_from_file_location("baseline_data", src / "postmux" / "ingress" / "data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DataText


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--baseline", type=Path, help="a checkout's src/ to compare with (e.g. main's)")
    args = parser.parse_args()
    readers = {"refuse": reader(DataText), "fold": reader(DataText, fold=True)}
    if args.baseline:
        readers = {"baseline": reader(baseline(args.baseline)), **readers}
    print("| message | " + " | ".join(f"{name} µs" for name in readers) + " |")
    print("|---|" + "---:|" * len(readers))
    for label, message in messages().items():
        cells = []
        for name, read in readers.items():
            if name != "fold" and max(map(len, message.split(b"\r\n"))) > 999:
                cells.append("refused")
                continue
            one = functools.partial(read, message)
            best = min(timeit.repeat(one, repeat=args.repeat, number=args.number))
            cells.append(f"{best / args.number * 1e6:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
