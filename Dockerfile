# syntax=docker/dockerfile:1
# Build stage: wheels for the package and its dependencies (hiredis, orjson, numpy ship manylinux wheels).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Run stage: no compilers, no sources, a non-root user.
FROM python:3.12-slim
RUN useradd --create-home --uid 10001 gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/embedding-gateway
USER gateway
EXPOSE 8080
ENV PYTHONUNBUFFERED=1
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["embedding-gateway"]
CMD ["serve", "--config", "/etc/embedding-gateway/demo.yaml", "--host", "0.0.0.0", "--port", "8080"]
