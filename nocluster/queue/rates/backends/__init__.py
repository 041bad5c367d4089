"""Rate limiter backends: ``local`` (one process) and ``redis`` (the whole cluster)."""
