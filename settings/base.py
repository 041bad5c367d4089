"""Settings for a nocluster node.

Every value comes from the environment, with embedded defaults that need no server: SQLite, LocMemCache,
in-process pub/sub, an event queue in the database (shared by every process of the project on one
machine) and process-local locks. Setting ``DATABASE_URL``,
``REDIS_URL`` and ``BROKER_URL`` turns the node into a cluster node. The README lists every variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    value = env(name)
    if not value:
        return default
    return value.lower() in {"1", "true", "yes", "on"}


# Off unless asked for (`make run` asks for it): a node started any other way serves no debug pages.
DEBUG = env_bool("DJANGO_DEBUG", False)
# The committed key, for development only: `runnode` refuses it when DEBUG is off, and `check --deploy` flags it
# (nocluster.E004).
DEVELOPMENT_SECRET_KEY = "insecure-dev-key-set-DJANGO_SECRET_KEY-in-production"  # noqa: S105 (public on purpose)
SECRET_KEY = env("DJANGO_SECRET_KEY", DEVELOPMENT_SECRET_KEY)
ALLOWED_HOSTS = [h for h in env("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h]

INSTALLED_APPS = [
    "nocluster",  # before staticfiles: its runserver also starts this node's consumers
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "tasks",
    # Plugins, in load order.
    "plugins.auth",
    "plugins.data_source_main",
    "plugins.async_task_manager",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's static files under runnode (gunicorn) too, without a separate web server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "nocluster.urls"
WSGI_APPLICATION = "nocluster.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: SQLite unless DATABASE_URL is set (PostgreSQL in a cluster). ---
DATABASE_URL = env("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's backend, with the outbox's rows sent in the commit's round trip (nocluster/postgresql/base.py).
    DATABASES["default"]["ENGINE"] = "nocluster.postgresql"
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Every process of the project shares the file (the embedded event queue and outbox are tables in it):
    # WAL lets readers run beside the writer, IMMEDIATE takes the write lock when a transaction begins (so two
    # processes never read the same queue row and both update it), and a writer waits up to 20 s for the lock.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache: LocMemCache unless REDIS_URL is set (django-redis in a cluster). ---
REDIS_URL = env("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            # JSON, never pickle: every node reads what another wrote, and a value is data, not code.
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SERIALIZER": "django_redis.serializers.json.JSONSerializer",
            },
        },
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "nocluster"}}
# A process-local store is always available, for caches that must never leave the process.
CACHES["local"] = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "nocluster-local"}

# --- Brokers: in-process unless BROKER_URL is set (amqp:// for RabbitMQ or redis:// for Redis). ---
BROKER_URL = env("BROKER_URL")
PUBSUB_URL = env("PUBSUB_URL", BROKER_URL)
# --- Rate limits of queue channels: for the whole cluster in Redis (the locks' one by default), else per process.
RATE_LIMIT_URL = env("NOCLUSTER_RATE_LIMIT_URL", REDIS_URL)

NOCLUSTER: dict[str, Any] = {
    "NAME": env("NOCLUSTER_NAME", "main"),
    "PUBSUB": (
        {
            "BACKEND": "nocluster.pubsub.backends.kombu.KombuPubSubBackend",
            # RabbitMQ: durable exchanges and queues, persistent messages (confirmed ones survive a broker restart).
            "OPTIONS": {"url": PUBSUB_URL, "durable": env_bool("NOCLUSTER_PUBSUB_DURABLE", True)},
        }
        if PUBSUB_URL
        else {"BACKEND": "nocluster.pubsub.backends.local.LocalPubSubBackend", "OPTIONS": {}}
    ),
    "EVENT_QUEUE": (
        {
            "BACKEND": "nocluster.queue.backends.celery.CeleryQueueBackend",
            "OPTIONS": {
                "broker_url": BROKER_URL,
                # Seconds: Celery's time limits and the Redis visibility timeout are derived from them.
                "max_timeout": float(env("NOCLUSTER_QUEUE_MAX_TIMEOUT", "300")),
                "grace": float(env("NOCLUSTER_QUEUE_GRACE", "5")),
                "retry_backoff": float(env("NOCLUSTER_QUEUE_RETRY_BACKOFF", "1")),
                "retry_backoff_max": float(env("NOCLUSTER_QUEUE_RETRY_BACKOFF_MAX", "60")),
                "defer_delay": float(env("NOCLUSTER_QUEUE_DEFER_DELAY", "0.5")),
                # RabbitMQ: "classic" or "quorum" (replicated) queues.
                "queue_type": env("NOCLUSTER_QUEUE_TYPE", "classic"),
                # Redis: a worker silent for gone_after seconds is gone; its messages go back on their queues.
                "heartbeat": float(env("NOCLUSTER_HEARTBEAT", "5")),
                "gone_after": float(env("NOCLUSTER_NODE_GONE_AFTER", "15")),
            },
        }
        if BROKER_URL
        else {"BACKEND": "nocluster.queue.backends.database.DatabaseQueueBackend", "OPTIONS": {}}
    ),
    "LOCKS": (
        {"BACKEND": "nocluster.locks.backends.redis.RedisLockBackend", "OPTIONS": {"url": REDIS_URL}}
        if REDIS_URL
        else {"BACKEND": "nocluster.locks.backends.local.LocalLockBackend", "OPTIONS": {}}
    ),
    "RATE_LIMITS": (
        {"BACKEND": "nocluster.queue.rates.backends.redis.RedisRateLimiter", "OPTIONS": {"url": RATE_LIMIT_URL}}
        if RATE_LIMIT_URL
        else {"BACKEND": "nocluster.queue.rates.backends.local.LocalRateLimiter", "OPTIONS": {}}
    ),
    "SYNC": {"DEBOUNCE": float(env("NOCLUSTER_SYNC_DEBOUNCE", "1.0"))},
    # W3C trace context in every message, and handler spans, when OpenTelemetry is installed (docs/tracing.md).
    "TRACING": env_bool("NOCLUSTER_TRACING", True),
    # Periodic jobs (nocluster/schedule/): whether this process claims slots, and how late a slot is still on time.
    "SCHEDULE": {
        "ENABLED": env_bool("NOCLUSTER_SCHEDULER", True),
        "GRACE": float(env("NOCLUSTER_SCHEDULE_GRACE", "5")),
    },
    # Prometheus metrics (nocluster/metrics/, docs/metrics.md): off unless NOCLUSTER_METRICS is set. /metrics needs
    # the bearer token when one is set; a Celery worker serves them on PORT; DIR is the multiprocess folder.
    "METRICS": {
        "ENABLED": env_bool("NOCLUSTER_METRICS", False),
        "TOKEN": env("NOCLUSTER_METRICS_TOKEN"),
        "PORT": env("NOCLUSTER_METRICS_PORT") or None,
        "DIR": env("NOCLUSTER_METRICS_DIR"),
    },
    # The node registry (nocluster/nodes.py), in seconds.
    "NODES": {
        "ENABLED": env_bool("NOCLUSTER_NODE_REGISTRY", True),
        "HEARTBEAT": float(env("NOCLUSTER_HEARTBEAT", "5")),
        "GONE_AFTER": float(env("NOCLUSTER_NODE_GONE_AFTER", "15")),
        "REMOVE_AFTER": float(env("NOCLUSTER_NODE_REMOVE_AFTER", "300")),
    },
}

# The event queue channels this node consumes (comma-separated; empty: every subscribed one). A Celery worker's
# --channels option overrides it.
NOCLUSTER["EVENT_QUEUE"]["CHANNELS"] = [name.strip() for name in env("NOCLUSTER_WORKER_CHANNELS").split(",")
                                        if name.strip()] or None  # fmt: skip

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where collectstatic writes (the Dockerfile sets it); unset, WhiteNoise serves the files from the apps.
STATIC_ROOT = env("STATIC_ROOT") or None
WHITENOISE_USE_FINDERS = True

LOG_LEVEL = env("LOG_LEVEL", "INFO")
LOG_FORMAT = env("NOCLUSTER_LOG_FORMAT", "text")  # "text" or "json" (one JSON object per line)
TASK_LOG_LEVEL = env("NOCLUSTER_TASK_LOG_LEVEL", "WARNING")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"node": {"()": "nocluster.logs.NodeContextFilter"}},
    "formatters": {
        "text": {"()": "nocluster.logs.TextFormatter"},
        "json": {"()": "nocluster.logs.JSONFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "text",
            "filters": ["node"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"level": "INFO"},
        "kombu": {"level": "WARNING"},
        "celery": {"level": "INFO"},
        # Celery's two lines per message ("received", "succeeded in"), as `celery worker -l INFO` would print them:
        # off unless asked for (at a few hundred messages a second they cost a worker ~5% and 300 bytes a message).
        "celery.worker.strategy": {"level": TASK_LOG_LEVEL},
        "celery.app.trace": {"level": TASK_LOG_LEVEL},
    },
}
