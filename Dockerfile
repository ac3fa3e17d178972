# Image of the streamer service: `docker build -t streamer .` from the repository root.
#
# requirements.txt pins the default (CUDA) torch wheels, which add several GB to the image.
# For a CPU-only image, pass the PyTorch CPU wheel index:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t streamer .
# The CUDA support packages (nvidia-*, cuda-*, triton) are then left out of the install.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_INDEX_URL=""

RUN python -m venv /opt/streamer
ENV PATH=/opt/streamer/bin:$PATH

WORKDIR /src
COPY requirements.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -Ev '^(nvidia-|cuda-|triton==)' requirements.txt > /tmp/requirements.txt \
        && pip install --index-url "$TORCH_INDEX_URL" "$(grep '^torch==' requirements.txt)"; \
    else \
        cp requirements.txt /tmp/requirements.txt; \
    fi \
    && pip install -r /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY streamer ./streamer
RUN pip install --no-deps .


FROM python:3.11-slim

ENV PATH=/opt/streamer/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMER_METRICS_HOST=0.0.0.0 \
    STREAMER_METRICS_PORT=9400

RUN groupadd --system --gid 10001 streamer \
    && useradd --system --uid 10001 --gid streamer --home-dir /home/streamer --create-home streamer

COPY --from=build /opt/streamer /opt/streamer

USER 10001:10001
WORKDIR /home/streamer

EXPOSE 9400

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMER_METRICS_PORT', '9400'), timeout=4)"]

# Exec form: the streamer process is PID 1 and receives SIGTERM itself on `docker stop`.
ENTRYPOINT ["streamer"]
CMD ["run"]
