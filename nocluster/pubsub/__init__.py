"""Cross-instance broadcast: ``app.pub_sub_manager`` (see :class:`PubSubManager`)."""

from nocluster.pubsub.manager import PubSubManager

__all__ = ["PubSubManager"]
