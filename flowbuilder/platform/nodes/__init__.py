"""Node types: what a workflow node can do, and the registry that names them.

Built-in types live in :mod:`.builtin` and :mod:`.http`; third-party packages add
theirs through the ``flowbuilder.nodes`` entry-point group (see :mod:`.registry`).
"""

from flowbuilder.platform.nodes.base import (
    CREDENTIAL_MODES,
    PORT_TYPES,
    CredentialMode,
    LogEntry,
    NodeCancelled,
    NodeContext,
    NodeCredential,
    NodeError,
    NodeLogger,
    NodeTimeout,
    NodeType,
    PortSpec,
    PortType,
    TransientNodeError,
    UnknownNodeType,
    types_compatible,
    value_matches,
)
from flowbuilder.platform.nodes.registry import (
    ENTRY_POINT_GROUP,
    find_node_type,
    get_node_type,
    node_types,
    register_node_type,
    reset_node_types,
    unregister_node_type,
)

__all__ = [
    "CREDENTIAL_MODES",
    "ENTRY_POINT_GROUP",
    "PORT_TYPES",
    "CredentialMode",
    "LogEntry",
    "NodeCancelled",
    "NodeContext",
    "NodeCredential",
    "NodeError",
    "NodeLogger",
    "NodeTimeout",
    "NodeType",
    "PortSpec",
    "PortType",
    "TransientNodeError",
    "UnknownNodeType",
    "find_node_type",
    "get_node_type",
    "node_types",
    "register_node_type",
    "reset_node_types",
    "types_compatible",
    "unregister_node_type",
    "value_matches",
]
