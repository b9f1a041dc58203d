# The app image used by compose.yaml (the database runs in its own PostGIS container).
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e .
ENTRYPOINT []
CMD ["spatialdb", "status"]
