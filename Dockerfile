# The engine and the example step service share this image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY hms_mgmt ./hms_mgmt
COPY bus_adapters ./bus_adapters
# compose.cluster.yaml builds it with EXTRAS=fast,postgres (asyncpg, for the PostgreSQL store)
ARG EXTRAS=fast
RUN pip install --no-cache-dir ".[${EXTRAS}]"
COPY examples ./examples
ENV HMS_LOG_FORMAT=json
CMD ["python", "-m", "hms_mgmt.engine"]
