"""Event queue backends: ``memory`` (threads in this process) and ``celery`` (Celery on RabbitMQ or Redis)."""
