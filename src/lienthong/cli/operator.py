"""The operator's identity for CLI actions on a node: unrestricted, but audited like any caller."""

from __future__ import annotations

import getpass

from lienthong.interactions.context import Context
from lienthong.node import Node


def operator_context(node: Node, facility: str | None = None) -> Context:
    """A context whose principal is the operating-system account running the command (acting for `facility`)."""
    from lienthong.security.policy import Principal
    from lienthong.security.scopes import parse_scopes

    scopes, _ = parse_scopes("system/*.cruds")
    actor = f"os:{getpass.getuser()}"
    return Context(base_url="urn:lienthong:cli", extra={"node": "cli"},
                   principal=Principal("client", actor, actor, scopes, facility))


def open_node(db: str | None) -> Node:
    from lienthong.api.app import ApiSettings
    from lienthong.node import build_node, open_database

    return build_node(open_database(db), ApiSettings(node_name="cli"), secure=True)
