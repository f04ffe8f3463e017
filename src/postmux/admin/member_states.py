"""Where an operator's member states live: which members are drained (`postmux drain`, until `enable`).

One seam, `MemberStates`, two places:

- `DrainedMembers`: one node, a small JSON file beside the spool (drained.json), so a drain outlives a
  restart.
- `RedisMemberStates` ([throttles] backend = "redis"): every node sharing the Redis prefix, so a drain
  on one node holds on all of them, and outlives the restart of any of them. A hash `{prefix}members`,
  a field per member, its value {"draining", "node", "at"}: the last change, which node's operator made
  it and when (an `enable` stays as a field too, so the others can say who enabled it). The other nodes
  read it on each heartbeat (every 2 s; `refresh`), which is simpler than pub/sub and as robust: a
  message published while a node is cut off would be lost, and it would have to read the state on
  reconnecting anyway. The whole hash is a few members: one read is as cheap as a version key.

While Redis is away a node keeps the states it last read, and an operator's change on it applies to it
at once and waits to be written: when Redis answers again it is written, unless a change of the same
member made meanwhile on another node is later (by the nodes' clocks; the later one wins, on every
node). The states last read are also kept in the node's drained.json, so a node that starts while Redis
is away starts with them; and a Redis that lost the hash (restarted without persistence) is given back
the drains the first node to see it empty still knows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from postmux.scheduling.redis_throttles import RedisAway, RedisThrottles

log = structlog.get_logger("postmux.control")


@dataclass(frozen=True, slots=True)
class OperatorState:
    """A member's state as an operator last set it: drained or not, on which node, when (its clock)."""

    draining: bool
    node: str = ""
    at: float = 0.0


class MemberStates(Protocol):
    """Where operators' drains are kept (see the module's docstring)."""

    def load(self) -> set[str]:
        """The drained members as last known, at start and after a reload. Cost: a file read (and with
        Redis one round trip, else what the file kept)."""
        ...

    def record(self, name: str, draining: bool) -> None:
        """An operator drained (or enabled) `name` on this node: kept for a restart and for the other
        nodes. Raises OSError when it cannot be kept at all (the change still holds until a restart)."""
        ...

    def refresh(self) -> dict[str, OperatorState] | None:
        """Every member's state as the nodes share it now, for this node to follow; None when there is
        nothing to follow (one node) or the shared store is away (keep what is known). Cost: one round
        trip, every heartbeat."""
        ...


class DrainedMembers:
    """The members an operator drained, in a small JSON file beside the spool (drained.json).

    Written atomically on each drain and enable: a new file, fsync'd, renamed over the old, so a crash
    leaves the old list or the new one, never half of one.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._names: set[str] | None = None

    def load(self) -> set[str]:
        self._names = self._read()
        return set(self._names)

    def _read(self) -> set[str]:
        if self.path is None or not self.path.exists():
            return set()
        try:
            names = json.loads(self.path.read_text())["drained"]
            return {str(n) for n in names}
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Unreadable: start with every member in service, and say so (a drain may need repeating).
            log.error(
                "drained members file unreadable; no member is drained", path=str(self.path), error=str(e)
            )
            return set()

    def known(self) -> set[str]:
        """The drained members as last read or written (read now if never)."""
        return self.load() if self._names is None else set(self._names)

    def record(self, name: str, draining: bool) -> None:
        names = self.known()
        self.save(names | {name} if draining else names - {name})

    def refresh(self) -> dict[str, OperatorState] | None:
        return None  # one node: no other to follow

    def save(self, names: set[str]) -> None:
        if names == self._names:
            return
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("w") as f:
                json.dump({"drained": sorted(names)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._names = set(names)


# KEYS: the states hash. ARGV: seeds count, then name, state pairs: the seeds (written only if the hash is
# gone), then this node's changes (each written unless the stored one is later). Every state, as pairs.
_SYNC = """
local seeds = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 2, 1 + 2 * seeds, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
for i = 2 + 2 * seeds, #ARGV, 2 do
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  if not stored or cjson.decode(stored).at <= cjson.decode(ARGV[i + 1]).at then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return redis.call('HGETALL', KEYS[1])
"""


class RedisMemberStates:
    """Operators' drains shared by every node of a Redis prefix (see the module's docstring).

    `cache` keeps the drained names last read, for a start while Redis is away. `node`: this node's name,
    written with its operators' changes; `clock`: when they were made (wall time: the nodes compare it).
    """

    def __init__(
        self,
        throttles: RedisThrottles,
        cache: DrainedMembers,
        node: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.throttles = throttles
        self.cache = cache
        self.node = node
        self.clock = clock
        self.key = f"{throttles.prefix}members"
        self._sync = throttles.client.register_script(_SYNC)
        self._pending: dict[str, OperatorState] = {}  # this node's changes not written yet

    def load(self) -> set[str]:
        states = self.refresh()
        if states is None:
            return self.cache.load()
        return {name for name, state in states.items() if state.draining}

    def record(self, name: str, draining: bool) -> None:
        self._pending[name] = OperatorState(draining, self.node, self.clock())
        if self.refresh() is None:
            log.warning(
                "Redis away: the change holds on this node and is written to the others when it is back",
                member=name,
                draining=draining,
            )
            self.cache.record(name, draining)

    def refresh(self) -> dict[str, OperatorState] | None:
        known = self.cache.known()
        args: list[Any] = [len(known)]
        for name in sorted(known):  # given back if Redis lost the hash: drained, as long ago as can be
            args += [name, _text(OperatorState(True, self.node, 0.0))]
        for name, state in self._pending.items():
            args += [name, _text(state)]
        try:
            flat = self.throttles.call(self._sync, [self.key], args)
        except RedisAway:
            return None
        self._pending.clear()
        states = {flat[i].decode(): _state(flat[i + 1]) for i in range(0, len(flat), 2)}
        try:
            self.cache.save({name for name, state in states.items() if state.draining})
        except OSError as e:
            log.error(
                "drained members not kept on disk: a start while Redis is away forgets them", error=str(e)
            )
        return states


def _text(state: OperatorState) -> str:
    return json.dumps({"draining": state.draining, "node": state.node, "at": state.at})


def _state(raw: bytes) -> OperatorState:
    try:
        fields = json.loads(raw)
        return OperatorState(
            bool(fields["draining"]), str(fields.get("node", "")), float(fields.get("at", 0))
        )
    except (ValueError, KeyError, TypeError):
        return OperatorState(False)  # not ours (someone wrote the key by hand): in service, as no state
