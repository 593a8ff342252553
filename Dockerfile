# insitechat-bridge: a small image that runs as a non-root user.
# Build:  docker build -t insitechat-bridge .
# Run:    docker run --env-file bridge.env -v "$PWD/config.yaml:/config/config.yaml:ro" \
#           -v bridge-state:/data -p 8080:8080 insitechat-bridge
FROM python:3.11-slim AS build
WORKDIR /src
# Only what the package needs: the project's own metadata decides the dependencies.
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY adapters ./adapters
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INSITECHAT_BRIDGE_CONFIG=/config/config.yaml
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /data --create-home bridge
WORKDIR /data
VOLUME ["/data"]
USER bridge
EXPOSE 8080
# /healthz answers while the process is alive; the slim image has no curl, Python does the probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["insitechat-bridge"]
CMD ["run"]
