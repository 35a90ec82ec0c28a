# syntax=docker/dockerfile:1
# Build stage: wheels for the package and its dependencies (hiredis, orjson, numpy ship manylinux wheels).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Run stage: no compilers, no sources, a non-root user with a numeric uid (runAsNonRoot can check it).
FROM python:3.12-slim
RUN useradd --create-home --uid 10001 --user-group gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/embedding-gateway
USER 10001:10001
EXPOSE 8080
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The gateway is PID 1 (exec form): SIGTERM reaches it and it drains (config: shutdown_timeout_s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=2s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["embedding-gateway"]
CMD ["serve", "--config", "/etc/embedding-gateway/demo.yaml", "--host", "0.0.0.0", "--port", "8080"]
