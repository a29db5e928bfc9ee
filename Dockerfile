# biomero-importer: the production image.
#
#   docker build -t biomero-importer .
#   docker compose -f deploy/compose.yml up      (or drop deploy/compose.yml into NL-BIOMERO)
#
# Stages:
#   python  - a virtualenv with biomero-importer[omero], omero-py and a prebuilt Ice 3.6.5
#   jars    - the OMERO.java jars that `omero import` runs, at a pinned version
#   runtime - Python 3.12 + Java 17 + rootless Podman for the preprocessing containers
#
# The image runs as uid 1000 (autoimportuser, as the original image did) from /auto-importer,
# with the configuration in /auto-importer/config and logs in /auto-importer/logs.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS python

# omero-py needs zeroc-ice >=3.6.5,<3.7. Its source package only compiles up to Python 3.10,
# so we install Glencoe Software's prebuilt manylinux_2_28 wheel for CPython 3.12 (bookworm
# has glibc 2.36). x86_64 only: for arm64 use conda-forge's zeroc-ice=3.6.5 instead.
# See https://www.glencoesoftware.com/blog/2023/12/08/ice-binaries-for-omero.html
ARG ICE_WHEEL_URL=https://github.com/glencoesoftware/zeroc-ice-py-linux-x86_64/releases/download/20240202/zeroc_ice-3.6.5-cp312-cp312-manylinux_2_28_x86_64.whl
# The newest omero-py; it needs Python >= 3.10 and numpy >= 2.
ARG OMERO_PY_VERSION=5.23.0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Ice first, so the omero-py resolution below finds it installed and never tries to build it.
# The wheel URL pins the exact build (DL3013 cannot see a version in a URL).
# hadolint ignore=DL3013
RUN pip install "${ICE_WHEEL_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY migrations ./migrations
# A regular (non-editable) install: the migrations are packed into the wheel
# (biomero_importer/_migrations) and found there at run time. "." is this checkout (its
# version is the image's); omero-py is pinned here, the other dependencies by the ranges
# in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[omero,import-options,demo]" "omero-py==${OMERO_PY_VERSION}" \
    && python -c "import Ice, omero, omero.cli, biomero_importer, biomero_schema.imports" \
    && biomero-importer --help > /dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS jars

# `omero import` runs the Java importer from $OMERODIR/lib/client and only downloads jars
# (the "latest" ones, at run time, into the user's cache) when that folder is missing.
# Fetching a pinned OMERO.java here makes every container of one image import with the same
# importer and needs no internet at run time. Use the 5.6.x release that matches your
# OMERO.server. The URL is the one `omero import --fetch-jars VERSION` downloads.
ARG OMERO_JAVA_VERSION=5.6.14
# sha256 of that OMERO.java.zip. Set it (docker build --build-arg OMERO_JAVA_SHA256=...) to
# make the build fail on any other content; compute it once with `sha256sum OMERO.java.zip`.
ARG OMERO_JAVA_SHA256=""

COPY deploy/omero/fetch_omero_java.py /tmp/fetch_omero_java.py
RUN python /tmp/fetch_omero_java.py "${OMERO_JAVA_VERSION}" /opt/omero
COPY deploy/omero/logback-cli.xml /opt/omero/etc/logback-cli.xml

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="biomero-importer" \
      org.opencontainers.image.description="Imports microscopy data into OMERO for BIOMERO, from orders in PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0"

# - Java 17 runs the OMERO.java importer behind `omero import`.
# - podman, runc, fuse-overlayfs, uidmap (newuidmap/newgidmap) and slirp4netns run the
#   preprocessing containers rootless inside this container (podman-in-container).
# Versions come from Debian bookworm and its security updates; pinning exact Debian
# revisions would break the build each time the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        fuse-overlayfs \
        openjdk-17-jre-headless \
        podman \
        runc \
        slirp4netns \
        tini \
        uidmap \
    && rm -rf /var/lib/apt/lists/*

# uid/gid 1000 like the original image (files it wrote on /data and in the logs keep their
# owner). subuid/subgid give rootless Podman 64k ids below and above 1000: that fits inside
# the 65536 ids of an outer rootless user namespace (podman run --userns=keep-id) as well as
# in a privileged Docker container.
RUN groupadd --gid 1000 autoimportuser \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash autoimportuser
COPY deploy/podman/subuid /etc/subuid
COPY deploy/podman/subgid /etc/subgid
COPY deploy/podman/containers.conf /etc/containers/containers.conf
COPY --chown=1000:1000 deploy/podman/storage.conf /home/autoimportuser/.config/containers/storage.conf
# The folder a named volume is mounted on for Podman's image store must exist and belong to
# uid 1000, so Docker copies that ownership into a new volume.
RUN mkdir -p /home/autoimportuser/.local/share/containers/storage \
        /auto-importer/config /auto-importer/logs \
    && chown -R 1000:1000 /home/autoimportuser /auto-importer

COPY --from=python /opt/venv /opt/venv
COPY --from=jars /opt/omero /opt/omero
COPY --chown=1000:1000 config/settings.yml /auto-importer/config/settings.yml

# OMERODIR: where `omero import` finds lib/client/*.jar and etc/logback-cli.xml.
# Metrics and health: /metrics, /healthz and /readyz on port 9464 on all interfaces, so the
# HEALTHCHECK below and a Prometheus on the compose network can reach them. These are
# environment variables and therefore win over the same keys in config/settings.yml.
ENV PATH=/opt/venv/bin:$PATH \
    OMERODIR=/opt/omero \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BIOMERO_IMPORTER_METRICS_PORT=9464 \
    BIOMERO_IMPORTER_METRICS_HOST=0.0.0.0

WORKDIR /auto-importer
USER 1000:1000

EXPOSE 9464

# /healthz answers 200 while the process runs, the database answers and the NOTIFY listener
# is connected, 503 otherwise. No curl in the image: Python's urllib does it (an HTTP error
# or a refused connection raises, which exits 1).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BIOMERO_IMPORTER_METRICS_PORT', '9464') + '/healthz', timeout=8)"]

# tini reaps the podman and omero child processes and forwards SIGTERM, so the service can
# hand running orders back before the container stops (see shutdown_timeout; give the
# container a stop_grace_period longer than it).
ENTRYPOINT ["tini", "--", "biomero-importer"]
CMD ["run"]
