"""CRUD functions: keyword-only ``session``, scoped by user id, flush but never commit.

The caller's unit of work (a task, a CLI command, an API request) commits.
"""
