"""User groups: which group each user_id belongs to (`resolve_groups`).

Training (per-group metrics, group-robust DPO) and evaluation (per-group accuracy) both read them, so
they live with the data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml

__all__ = ["LAB_USER", "resolve_groups"]

# A lab user id: ``group:NAME/K`` (`prefkit.lab` annotators write them).
LAB_USER = re.compile(r"^group:(?P<group>.+)/\d+$")


def resolve_groups(spec: str, users: Sequence[str]) -> dict[str, str]:
    """``{user_id: group}`` for ``users``: ``spec = "lab"`` reads lab user ids ``group:NAME/K``; otherwise
    ``spec`` is a JSON or YAML file mapping user ids to group names. Every user needs a group."""
    if spec == "lab":
        groups = {}
        for user in users:
            match = LAB_USER.match(user)
            if match is None:
                raise ValueError(f"--groups lab: user_id {user!r} is not a lab user id (group:NAME/K)")
            groups[user] = match["group"]
        return groups
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--groups {spec}: no such file (give 'lab' or a JSON/YAML mapping user_id -> group)")
    mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a mapping user_id -> group, got {type(mapping).__name__}")
    mapping = {str(k): str(v) for k, v in mapping.items()}
    missing = [u for u in users if u not in mapping]
    if missing:
        raise ValueError(f"{path}: no group for {len(missing)} user(s), e.g. {missing[:5]}")
    return {u: mapping[u] for u in users}
