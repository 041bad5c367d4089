"""Who this process is in the cluster: the project's name and this process's instance id.

Every manager gets the node's :class:`NodeIdentity` from the composition root (``nocluster.app``) instead of
reaching for the global application. The object is shared and updated in place: after ``fork()`` the child is a
new node, and :meth:`NodeIdentity.renew` gives it a new instance id that every manager then sees.
"""

from __future__ import annotations

import uuid


def new_instance_id() -> str:
    """A fresh instance id: uuid4 hex (32 characters)."""
    return uuid.uuid4().hex


class NodeIdentity:
    """The name of the project and the id of this process.

    Attributes:
      name: ``NOCLUSTER["NAME"]``, the prefix of every channel, cache key and lock key.
      instance_id: unique per process (uuid4 hex); shown in logs, envelopes, lock records and the node registry.
      role: what the node registry shows for this process (``"web"``, ``"worker"``, ``"node"``).
    """

    __slots__ = ("instance_id", "name", "role")

    def __init__(self, name: str, instance_id: str | None = None, role: str = "node") -> None:
        self.name = name
        self.instance_id = instance_id or new_instance_id()
        self.role = role

    @property
    def short_id(self) -> str:
        """The first 8 characters of the instance id, as logs and thread names show it."""
        return self.instance_id[:8]

    def renew(self) -> None:
        """Become a new node (in a forked child): a new instance id, the same name and role."""
        self.instance_id = new_instance_id()

    def __repr__(self) -> str:
        return f"<NodeIdentity {self.name!r} {self.short_id} {self.role}>"
