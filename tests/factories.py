"""Factories for users and workflows (real rows, through the CRUD functions)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel import Session

from flowbuilder.platform.crud import balance_crud, user_crud, workflow_crud
from flowbuilder.platform.models import User, UserCreate, Workflow, WorkflowCreate


def make_user(session: Session, *, credits: int = 0, guest: bool = False, **fields: Any) -> User:
    if guest:
        user, _token = user_crud.create_guest(session=session, client_key=uuid.uuid4().hex)
    else:
        fields.setdefault("email", f"user-{uuid.uuid4().hex[:10]}@example.com")
        user = user_crud.create_user(session=session, data=UserCreate(**fields))
    if credits:
        balance_crud.grant_credits(session=session, user_id=user.id, amount=credits)
    session.flush()
    return user


def json_definition(steps: int = 2) -> dict[str, Any]:
    """A small valid definition: a chain of add_property_to_json nodes (no network)."""
    nodes = []
    edges = []
    for i in range(steps):
        node_id = f"n{i}"
        inputs: dict[str, Any] = {"property_path": f"step{i}", "value": i}
        if i == 0:
            inputs["json"] = {"start": True}
        nodes.append({"id": node_id, "type": "add_property_to_json", "inputs": inputs})
        if i:
            edges.append(
                {
                    "source": f"n{i - 1}",
                    "sourceHandle": "json",
                    "target": node_id,
                    "targetHandle": "json",
                }
            )
    return {"version": 1, "nodes": nodes, "edges": edges}


def credential_definition(credential_id: Any) -> dict[str, Any]:
    """One http_request node that names ``credential_id`` (its URL is never reached)."""
    return {
        "version": 1,
        "nodes": [
            {
                "id": "call",
                "type": "http_request",
                "inputs": {"url": "http://example.invalid/x"},
                "credential_id": str(credential_id),
            }
        ],
        "edges": [],
    }


def make_workflow(
    session: Session,
    user: User,
    *,
    definition: dict[str, Any] | None = None,
    publish: bool = False,
    **fields: Any,
) -> Workflow:
    fields.setdefault("name", f"wf-{uuid.uuid4().hex[:8]}")
    data = WorkflowCreate(definition=definition if definition is not None else {}, **fields)
    workflow = workflow_crud.create_workflow(session=session, user_id=user.id, data=data)
    if publish:
        workflow_crud.publish_workflow(session=session, workflow_id=workflow.id, user_id=user.id)
    session.flush()
    return workflow
