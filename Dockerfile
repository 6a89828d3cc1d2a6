# syntax=docker/dockerfile:1
# tlsproxy's production image (docs/container.md):
#   docker build -t tlsproxy .
#   docker run -d -p 443:8443 -p 80:8080 -v tlsproxy-data:/data \
#       -v "$PWD/proxy.toml:/etc/tlsproxy/proxy.toml:ro" tlsproxy
# Non-root (uid 10001) on the high ports 8443/8080; publish them as 443/80.

# One pinned base for both stages: the venv built in the first runs in the second.
ARG PYTHON_IMAGE=python:3.11.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Where pip finds packages, and extra trust for a TLS-inspecting outbound proxy, if needed:
#   docker build --build-arg PIP_INDEX_URL=https://mirror.example/simple \
#       --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt ...
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_CERT=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Pinned dependencies (docker/requirements.txt, wheels only), then the project as a wheel
# built by a pinned hatchling (docker/build-requirements.txt) without build isolation.
# The runtime venv has no pip of its own (25 MB of pip and setuptools the image never
# runs): the build venv's pip installs into it with --python.
COPY docker/requirements.txt docker/build-requirements.txt docker/
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --only-binary=:all: \
        -r docker/build-requirements.txt \
    && python -m venv --without-pip /opt/tlsproxy \
    && /opt/build/bin/pip --python /opt/tlsproxy/bin/python install --no-cache-dir \
        --only-binary=:all: -r docker/requirements.txt
COPY pyproject.toml README.md ./
COPY proxy proxy
COPY acme_client acme_client
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation \
        --wheel-dir /wheels . \
    && /opt/build/bin/pip --python /opt/tlsproxy/bin/python install --no-cache-dir \
        --no-deps /wheels/*.whl

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 tlsproxy \
    && useradd --system --no-log-init --uid 10001 --gid tlsproxy \
        --home-dir /data --no-create-home --shell /usr/sbin/nologin tlsproxy \
    && mkdir /data \
    && chown tlsproxy:tlsproxy /data \
    && chmod 0700 /data
COPY --from=build /opt/tlsproxy /opt/tlsproxy
COPY docker/proxy.toml /etc/tlsproxy/proxy.toml
ENV PATH=/opt/tlsproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TLSPROXY_STORAGE=/data \
    TLSPROXY_ADMIN_LISTEN=127.0.0.1:9901
# Certificates and the ACME account must survive restarts (CA rate limits): keep /data.
VOLUME ["/data"]
EXPOSE 8443 8080
USER 10001:10001
# GET /healthz on the admin listener, never through an HTTP(S)_PROXY from the environment:
# 200 "ok" is healthy; 503 while draining, or no answer, raises (exit 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://' + os.environ['TLSPROXY_ADMIN_LISTEN'] + '/healthz', timeout=4)"]
# Exec form: tlsproxy is PID 1 and gets SIGTERM itself (graceful drain, up to
# shutdown_timeout = 30 s: give `docker stop` / Kubernetes more than that) and SIGHUP (reload).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tlsproxy"]
CMD ["run", "--config", "/etc/tlsproxy/proxy.toml"]
