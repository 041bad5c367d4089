"""The in-process nodes and committing PostgreSQL of the sync tests serve here too."""

from tests.sync.conftest import committing_postgres, make_node

__all__ = ["committing_postgres", "make_node"]
