# fetchd in a container: docs/container.md explains building and running it.
#
#   docker build -t fetchd .
#   docker run -d --name fetchd --init --stop-timeout 45 \
#       -v "$PWD/etc:/etc/fetchd:ro" -v fetchd-state:/var/lib/fetchd fetchd
#
# where etc/fetchd.yaml (and any password files) are readable by UID 10001.
#
# bookworm (Debian 12) is named explicitly: the plain 3.11-slim tag follows newer Debian releases.

# Stage 1: install fetchd and its dependencies into a virtual environment.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY fetchd/ fetchd/
RUN python -m venv /opt/fetchd \
    && /opt/fetchd/bin/pip install . \
    && /opt/fetchd/bin/fetchd --version

# Stage 2: the same base image (so the venv's interpreter links stay valid), the venv, and a
# user; no sources, no build tools.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="fetchd" \
      org.opencontainers.image.description="Mail retrieval daemon: POP3/IMAP into the local MTA"

# A fixed UID/GID, so that mounted files can be given to it (chown 10001) and Kubernetes'
# runAsNonRoot can check it.
# tini as PID 1: forwards signals to fetchd and reaps what an MDA or a password command
# leaves behind, also where no --init is given (Kubernetes).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fetchd \
    && useradd --system --uid 10001 --gid fetchd --home-dir /var/lib/fetchd --no-create-home \
        --shell /usr/sbin/nologin fetchd \
    && install -d -o root -g root -m 0755 /etc/fetchd \
    && install -d -o fetchd -g fetchd -m 0700 /var/lib/fetchd

COPY --from=build /opt/fetchd /opt/fetchd

# FETCHD_CONFIG: the default for -c, so `fetchd check`, `fetchd status` and `fetchd health`
# need no arguments. STATE_DIRECTORY: where the state database goes (state.sqlite3) unless the
# configuration sets state_file:.
ENV PATH=/opt/fetchd/bin:$PATH \
    FETCHD_CONFIG=/etc/fetchd/fetchd.yaml \
    STATE_DIRECTORY=/var/lib/fetchd \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Losing the state makes fetchd deliver again what it delivered before from mailboxes that
# keep their mail (keep: true): keep this on a volume.
VOLUME ["/var/lib/fetchd"]
WORKDIR /var/lib/fetchd
USER 10001:10001

# SIGTERM: fetchd finishes the message in hand (up to 30 s), then exits. Docker waits only
# 10 s before SIGKILL unless told otherwise: run with --stop-timeout 45 (docker stop -t 45,
# compose stop_grace_period: 45s).
STOPSIGNAL SIGTERM
# Healthy while the daemon's heartbeat in the state database is less than 90 s old.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["fetchd", "health"]

ENTRYPOINT ["/usr/bin/tini", "--", "fetchd"]
CMD ["run"]
