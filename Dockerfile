# The service: `docker build -t trio-dispatcher .`, then
# `docker run -p 127.0.0.1:3000:3000 -v dispatcher-data:/var/lib/dispatcher/var trio-dispatcher`
# (embedded store and outbox in the volume), or `docker compose up` for MongoDB and Redis. The
# configuration is /etc/dispatcher/config.toml (docker/config.toml: the defaults; mount your own
# over it); any key can be overridden as DISPATCHER__SECTION__KEY and secrets come from the
# environment (MONGODB_URL, REDIS_URL, SMTP_PASSWORD, TWILIO_AUTH_TOKEN,
# GOOGLE_APPLICATION_CREDENTIALS, DISPATCHER_API_KEYS). Dependencies install from
# requirements.lock (exact versions, as tested), then the project itself without resolving again.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY requirements.lock ./
RUN python -m pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY actors ./actors
RUN python -m pip install --no-deps . && python -m pip check && rm -rf /src

# An unprivileged user owning only its working directory (embedded store, outbox).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/dispatcher --shell /usr/sbin/nologin dispatcher \
    && mkdir -p /var/lib/dispatcher/var /etc/dispatcher \
    && chown -R dispatcher:dispatcher /var/lib/dispatcher
COPY docker/config.toml /etc/dispatcher/config.toml
# The embedded store's data and the outbox: a volume, so that the ledger outlives the container.
VOLUME /var/lib/dispatcher/var

# Listen on every interface of the container, log JSON.
ENV DISPATCHER__SERVER__HOST=0.0.0.0 \
    DISPATCHER__LOGGING__FORMAT=json

WORKDIR /var/lib/dispatcher
USER dispatcher
EXPOSE 3000
# Liveness (README, "Security and failure behaviour"): /-/healthz fails when the embedded store
# this service started has been down for more than 10 s; the service itself exits with status 1
# when it cannot restart the store, so run the container with a restart policy. No curl in the
# image: python's urllib, on the port the configuration may have moved.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/-/healthz' % os.environ.get('DISPATCHER__SERVER__PORT', '3000'), timeout=4)"]
# SIGTERM (docker stop) drains the sends in flight for [dispatcher].drain_timeout_seconds: give
# the container at least that long to stop (`docker stop -t 40`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dispatcher"]
# One process per CPU given to the container when REDIS_URL (or [cluster].redis_url) is set, which
# the processes need to share the channels' limits; one process otherwise (README, "Cluster mode").
CMD ["serve", "--workers", "auto", "--config", "/etc/dispatcher/config.toml"]
