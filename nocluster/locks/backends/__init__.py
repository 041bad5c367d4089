"""Lock backends, one per file: ``local`` (threads of one process) and ``redis`` (python-redis-lock)."""
