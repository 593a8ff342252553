# insitechat-bridge: a small image that runs as a non-root user.
# Build:  docker build -t insitechat-bridge .
# Run:    docker run --env-file bridge.env -v "$PWD/config.yaml:/config/config.yaml:ro" \
#           -v bridge-state:/data -p 8080:8080 insitechat-bridge
FROM python:3.11-slim AS build
WORKDIR /src
# The dependencies first, from the project's own metadata: a code change then reuses this layer
# instead of reinstalling every dependency.
# With the fast extra (hiredis, redis-py's C reply parser): the image is what replicas on Redis
# run, and it takes a quarter to a half of the client CPU per Redis command off (bench/REPLICAS.md);
# its wheels are prebuilt for this platform, so the image needs no compiler for it.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['fast']))" \
        > requirements.txt \
    && pip install --no-cache-dir --prefix=/install -r requirements.txt
COPY README.md ./
COPY bridge ./bridge
COPY adapters ./adapters
RUN pip install --no-cache-dir --prefix=/install --no-deps .

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
# /healthz answers while the process is alive; `health` reads the port from the config's
# server.listen (no secret needed), so the probe follows a changed port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["insitechat-bridge", "health"]
ENTRYPOINT ["insitechat-bridge"]
CMD ["run"]
