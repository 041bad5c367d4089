"""Plugin state-change signals over pub/sub: ``app.sync_message_manager`` (see :class:`SyncMessageManager`)."""

from nocluster.sync.manager import SyncMessageManager

__all__ = ["SyncMessageManager"]
