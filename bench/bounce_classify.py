"""What one bounce classification costs (issue 15): the shipped table, compiled once into one expression.

    .venv/bin/python bench/bounce_classify.py [--rounds 5] [--per-round 200000]

Classifies the failure replies of the tests' corpus (tests/unit/bounce_replies.txt: Gmail, Microsoft,
Yahoo, Postfix, Exim, Exchange and postmux's own replies, from a 5.1.1 matched by the first rules to an
Uncategorized that walks all of them) round robin, and prints µs per classification: the median of
--rounds rounds. For comparison, the same rules as an ordered list of expressions tried one by one (the
shape the module chose against).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.test_bounce_classes import CORPUS, reply_of

from postmux.reply import Reply
from postmux.reputation.bounces import UNCATEGORIZED, BounceClassifier


def ordered_list(classifier: BounceClassifier) -> object:
    expressions = [(re.compile(r.pattern(), re.IGNORECASE), r.bounce_class) for r in classifier.rules]

    def classify(reply: Reply) -> str:
        line = f"{reply.code} {reply.enhanced_code or '-'} {reply.text}"
        for expression, name in expressions:
            if expression.match(line):
                return name
        return UNCATEGORIZED

    return classify


def per_call_us(classify: object, replies: list[Reply], n: int) -> float:
    assert callable(classify)
    k = len(replies)
    start = time.perf_counter()
    for i in range(n):
        classify(replies[i % k])
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200_000)
    args = parser.parse_args()
    start = time.perf_counter()
    classifier = BounceClassifier.load()
    compile_ms = (time.perf_counter() - start) * 1e3
    replies = [reply_of(line) for _, line, _ in CORPUS]
    ordered = ordered_list(classifier)
    assert all(classifier.classify(r) == ordered(r) for r in replies)  # type: ignore[operator]
    lines = [f"{r.code} {r.enhanced_code or '-'} {r.text}" for r in replies]
    uncached = per_call_us(classifier.classify_line, lines, args.per_round)  # warm up
    figures = [per_call_us(classifier.classify_line, lines, args.per_round) for _ in range(args.rounds)]
    print(f"{'one expression':15s} {statistics.median(figures):6.2f} µs per classification, uncached")
    for name, fn in (("cached", classifier.classify), ("ordered list", ordered)):
        figures = [per_call_us(fn, replies, args.per_round) for _ in range(args.rounds)]
        print(f"{name:15s} {statistics.median(figures):6.2f} µs per classification (median of {args.rounds})")
    worst = Reply(554, "", "transaction failed")  # no rule matches: every alternative is tried
    worst_line = f"{worst.code} - {worst.text}"
    uncached = per_call_us(classifier.classify_line, [worst_line], args.per_round)
    print(f"{'worst case':15s} {uncached:6.2f} µs (Uncategorized, uncached: every rule is tried)")
    print(f"rules: {len(classifier.rules)}, replies: {len(replies)}, load and compile: {compile_ms:.1f} ms")


if __name__ == "__main__":
    main()
