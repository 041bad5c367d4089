"""Pub/sub backends, chosen by dotted path in ``NOCLUSTER["PUBSUB"]["BACKEND"]``."""
