# syntax=docker/dockerfile:1
# llm-sidecar container image.
#
#   docker build -t llm-sidecar:0.1.0 .
#   docker run --read-only --tmpfs /tmp -v "$PWD/sidecar.yaml:/etc/llm-sidecar/sidecar.yaml:ro" \
#     -p 8080:8080 -p 9464:9464 llm-sidecar:0.1.0 --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9464
#
# - Two stages: the build stage installs the package into a virtual environment at
#   /opt/venv and writes tiktoken's encodings into /opt/tiktoken; the runtime stage copies
#   just those two directories onto the same slim base, so no compiler, pip cache or
#   source tree ships.
# - Runs with no network: the encodings come from the bpe-openai dependency and are baked
#   in at build time; TIKTOKEN_CACHE_DIR points tiktoken at them.
# - Read-only root friendly: bytecode is compiled at build time and never written at run
#   time; the only writable paths the sidecar needs are /tmp and its data directory
#   (/var/lib/llm-sidecar), both volumes in Kubernetes (see helm/llm-sidecar).
# - Non-root: a numeric user (10001), so that runAsNonRoot can be checked by the kubelet.
#
# tests/test_dockerfile.py checks that every path copied here exists and runs this file's
# build-stage RUN steps in a fresh virtual environment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet . \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib
RUN /opt/venv/bin/python -c 'from sidecar.tokens import prepare_offline_cache; from pathlib import Path; prepare_offline_cache(Path("/opt/tiktoken"))' \
 && /opt/venv/bin/llm-sidecar --version

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="llm-sidecar" \
      org.opencontainers.image.description="Observability and SLA sidecar for LLM APIs" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin sidecar \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/llm-sidecar \
 && install -d -m 0755 /etc/llm-sidecar
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tiktoken /opt/tiktoken
ENV PATH=/opt/venv/bin:$PATH \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /var/lib/llm-sidecar
EXPOSE 8080 9464
# The admin listener's liveness endpoint (the pod uses its own probes; this is for docker run),
# asked directly: an HTTP(S)_PROXY in the environment must not take the call elsewhere.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9464/healthz', timeout=2); sys.exit(r.status != 200)"]
ENTRYPOINT ["llm-sidecar", "run"]
CMD ["--config", "/etc/llm-sidecar/sidecar.yaml", "--data-dir", "/var/lib/llm-sidecar"]
