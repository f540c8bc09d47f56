# syntax=docker/dockerfile:1
# Courier's serving image: the Ray Serve app on the rayproject/ray CPU image that KubeRay runs.
# Build from the repository root (what `make images` does):
#   docker build -f images/serving.Dockerfile -t courier-serving:0.1.0 .
# RAY_VERSION must equal the ray pin in pyproject.toml and the chart's ray.version
# (tests/test_chart.py checks all three).
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cpu

# The ray user (uid 1000, gid 100 "users") owns the image's Python; the chart runs every pod as it.
USER 0
RUN mkdir -p /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app

# Dependencies first, so a code change does not reinstall them. Everything pyproject.toml asks for,
# at requirements.lock's versions, minus PyTorch: serving runs the exported ONNX model, and Feast
# imports torch only when it is installed.
COPY --chown=1000:100 pyproject.toml requirements.lock ./
COPY --chown=1000:100 images/requirements.py /tmp/requirements.py
RUN python /tmp/requirements.py --exclude torch > /tmp/requirements.txt \
 && pip install --no-cache-dir --disable-pip-version-check -c requirements.lock -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/requirements.py

COPY --chown=1000:100 serving/ serving/
COPY --chown=1000:100 models/ models/
COPY --chown=1000:100 feature_repo/ feature_repo/

# The chart mounts the shared volume at /data. These links give the repository's relative paths
# (feature_store*.yaml's ../data/feast/registry.db, artifacts/, reports/) the meaning they have on a
# laptop. Byte-compile now: the root filesystem is read-only in the cluster.
RUN ln -s /data /app/data && ln -s /data/artifacts /app/artifacts && ln -s /data/reports /app/reports \
 && python -m compileall -q serving models feature_repo

ENV PYTHONPATH=/app \
    COURIER_DATA_DIR=/data \
    RAY_USAGE_STATS_ENABLED=0 \
    FEAST_USAGE=False \
    PYTHONUNBUFFERED=1
# 8000 Ray Serve HTTP, 8080 metrics; the rest stay cluster-internal (GCS 6379, dashboard 8265, client 10001).
EXPOSE 8000 8080
