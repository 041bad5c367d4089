"""Django's PostgreSQL backend with the outbox's rows inserted in the commit's round trip: ``ENGINE
"nocluster.postgresql"`` (see :mod:`nocluster.postgresql.base`)."""
