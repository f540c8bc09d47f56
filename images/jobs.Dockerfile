# syntax=docker/dockerfile:1
# Courier's jobs image: the simulator, Feast (apply, materialize, feature server), training and
# ONNX export, the live city, the monitor, Locust, the chaos drill and the helm test. Build from the
# repository root:
#   docker build -f images/jobs.Dockerfile -t courier-jobs:0.1.0 .
FROM python:3.11-slim-bookworm

# Same uid/gid as the ray user of the serving image, so both read and write the shared volume.
RUN useradd --uid 1000 --gid 100 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin courier
WORKDIR /app

# CPU PyTorch from its own index first, so nothing pulls a CUDA build; then the rest of
# pyproject.toml at requirements.lock's versions.
ARG TORCH_VERSION=2.13.0
COPY pyproject.toml requirements.lock ./
COPY images/requirements.py /tmp/requirements.py
RUN pip install --no-cache-dir --disable-pip-version-check \
      --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu" \
 && python /tmp/requirements.py --exclude torch > /tmp/requirements.txt \
 && pip install --no-cache-dir --disable-pip-version-check -c requirements.lock -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/requirements.py

COPY serving/ serving/
COPY models/ models/
COPY feature_repo/ feature_repo/
COPY loadtest/ loadtest/
COPY city/ city/
COPY monitoring/ monitoring/

# The shared volume is mounted at /data (see serving.Dockerfile); byte-compile for the read-only root.
RUN ln -s /data /app/data && ln -s /data/artifacts /app/artifacts && ln -s /data/reports /app/reports \
 && python -m compileall -q serving models feature_repo loadtest city monitoring

USER 1000:100
ENV PYTHONPATH=/app \
    HOME=/tmp \
    COURIER_DATA_DIR=/data \
    MPLCONFIGDIR=/tmp/matplotlib \
    RAY_USAGE_STATS_ENABLED=0 \
    FEAST_USAGE=False \
    PYTHONUNBUFFERED=1
CMD ["python", "-c", "print('courier jobs image: run python -m models.simulator, feature_repo.store, models.eta.train, locust or loadtest.chaos')"]
