# The sluice image: the CLI with the Kafka and PostgreSQL extras, and the example pipelines
# (pipelines/) under /app, the working directory, so `pipelines.<module>:<function>` handlers
# import as they do from a clone of the repository.
#
#   docker build -t sluice .
#   docker run --rm sluice run pipelines/quickstart.yaml --store postgresql://...
#   docker run --rm -p 8080:8080 sluice serve pipelines/quickstart.yaml --host 0.0.0.0 --auth-file ...
#
# Ports: 8080 `sluice serve` (the HTTP API, /healthz, /readyz, /metrics); 9100 `sluice run
# --metrics-port 9100` (/metrics, /healthz). docker-compose.yml and deploy/kubernetes/ use it.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

# The package only (pyproject.toml names README.md as its readme); the build tree is removed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sluice/ sluice/
RUN pip install --no-cache-dir '.[kafka,postgres]' \
    && rm -rf /src

# A user of its own; /app is its home, writable (the default SQLite data dir is ./.sluice).
WORKDIR /app
RUN groupadd --gid 10001 sluice \
    && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin sluice \
    && chown sluice:sluice /app
COPY --chown=sluice:sluice pipelines/ pipelines/

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

EXPOSE 8080 9100
ENTRYPOINT ["sluice"]
CMD ["--help"]
