"""User-visible asynchronous tasks (``tasks.api``): records, progress, cancellation from any node, admin."""
