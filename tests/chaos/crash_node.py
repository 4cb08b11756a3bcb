"""A test-only node type that kills its process: the crash-looping run of the poison set.

Loaded into chaos workers with ``celery worker --include tests.chaos.crash_node`` (a
plugin module registered only in the test worker) and imported by the test process so
that a definition using it validates.
"""

from __future__ import annotations

import os
from typing import Any

from flowbuilder.platform.nodes import register_node_type
from flowbuilder.platform.nodes.base import NodeType, PortSpec

CRASH_NODE = "chaos_crash"


def _crash(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    os._exit(137)  # as the OOM killer would: no cleanup, no acknowledgement


register_node_type(
    NodeType(
        type=CRASH_NODE,
        run=_crash,
        inputs={"data": PortSpec("any")},
        outputs={"data": PortSpec("any")},
        credits=1,
        description="test only: kills its worker process",
    ),
    replace=True,
)
