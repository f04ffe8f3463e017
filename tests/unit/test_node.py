"""[node] name as the node's identity: the name, its processes' instance ids, the default lease owner."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from postmux.config import NodeSettings, SpoolSettings
from postmux.node import instance_id, name_of_instance, node_name
from postmux.spool.factory import make_spool
from postmux.spool.postgres import PostgresSpool


def test_a_node_is_named_by_its_setting_else_by_its_host() -> None:
    assert node_name(NodeSettings(name="relay-eu-1")) == "relay-eu-1"
    assert node_name(NodeSettings()) == socket.gethostname()


def test_two_processes_of_one_name_are_two_instances_of_it() -> None:
    one, two = instance_id("a:b"), instance_id("a:b")
    assert one != two and one.startswith(f"a:b:{os.getpid()}:")
    assert name_of_instance(one) == name_of_instance(two) == "a:b"


def test_the_node_name_is_the_lease_owner_unless_spool_node_id_says_another(tmp_path: Path) -> None:
    def owner(node: str, **spool: str) -> str:
        settings = SpoolSettings(
            backend="postgresql", dsn="postgresql://x@127.0.0.1/x", path=str(tmp_path), **spool
        )
        spool_ = make_spool(settings, node)
        assert isinstance(spool_, PostgresSpool)
        return spool_.owner

    assert owner("relay-eu-1") == "relay-eu-1"
    assert owner("relay-eu-1", node_id="lease-owner") == "lease-owner"
    # No name set: host:PID, so two nodes on one host (each a process) never share an owner.
    assert owner("") == f"{socket.gethostname()}:{os.getpid()}"
