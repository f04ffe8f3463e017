"""Who this node is among several sharing a spool and limits: its name ([node] name) and its instance.

The name is what operators and events call the node; the instance is one process of it (the name, the
PID and a random part), what the Redis heartbeat and the health verdicts are keyed by. Two processes
given one name therefore never collide there (each is counted live, each verdict is its own), while
everything shown to people says the name. A name is meant to be unique all the same: it is the default
lease owner of a PostgreSQL spool ([spool] node_id), and two live processes owning one lease name would
take each other's leases at start (docs/deployment.md).
"""

from __future__ import annotations

import os
import socket

from postmux.config import NodeSettings


def node_name(settings: NodeSettings) -> str:
    """[node] name, or this host's name when it is not set (gethostname: the kernel's, no DNS)."""
    return settings.name or socket.gethostname()


def instance_id(name: str) -> str:
    """One process of the node `name`: name, PID and a random part (several Apps in one process)."""
    return f"{name}:{os.getpid()}:{os.urandom(3).hex()}"


def name_of_instance(instance: str) -> str:
    """The node name an `instance_id` was made from (a name may itself hold ':')."""
    return instance.rsplit(":", 2)[0]
