# classify-server for GPU nodes: ONNX Runtime's CUDA provider (onnxruntime-gpu, built for CUDA 13 + cuDNN 9),
# falling back to the CPU where no GPU is usable. Build and run:
#   docker build -t classify-service .
#   docker run --gpus all -p 8001:8001 -p 8002:8002 classify-service
#
# Base image: NVIDIA's CUDA image on Docker Hub, tag pattern nvidia/cuda:<CUDA version>-cudnn-runtime-ubuntu24.04
# (13.0.1 and 13.0.2 tags of it are in use in public Dockerfiles). The runtime flavour has the CUDA libraries ONNX
# Runtime loads (cuBLAS, cuFFT, cuRAND, NVRTC) and cuDNN 9, no compiler. Ubuntu 24.04 brings Python 3.12 from
# apt. Both stages start from this one image, so the virtual environment built in the first runs on the very same
# Python in the second. For reproducible builds pin it by digest: --build-arg CUDA_IMAGE=nvidia/cuda:...@sha256:...
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --- builder: a virtual environment with the package and its runtime dependencies, no extras (no torch) ---
FROM ${CUDA_IMAGE} AS builder

# python3 and python3-venv only: every dependency is a prebuilt wheel and the package is pure Python, so no
# compiler is needed. Versions come with the base image's Ubuntu release (pinning Ubuntu patch versions would
# break the build whenever the archive moves on).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

WORKDIR /src
# Dependencies first, read from pyproject.toml alone: editing the code or the README does not download them again.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt

COPY README.md ./
COPY serving/ serving/
COPY training/ training/
# The package itself (without extras: the server needs no torch), then pip out of the final environment; the
# --help run proves the entry point imports (ONNX Runtime included) before the image is built further.
RUN pip install --no-deps . \
    && classify-server --help > /dev/null \
    && pip uninstall --yes pip

# --- runtime: the CUDA runtime image, Python, the environment and the models; nothing to build with ---
FROM ${CUDA_IMAGE}

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 classify \
    && useradd --system --uid 10001 --gid classify --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin classify

COPY --from=builder /opt/venv /opt/venv
# Owned by root, readable by all: the server reads the repository; mount a volume over it (or point
# CLASSIFY_MODEL_REPOSITORY elsewhere) to serve other models or to load new versions at run time.
COPY models/ /opt/classify/models/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CLASSIFY_MODEL_REPOSITORY=/opt/classify/models \
    CLASSIFY_DEVICE=auto
WORKDIR /opt/classify

# A numeric user, so Kubernetes' runAsNonRoot can verify it without looking the name up.
USER 10001:10001

# gRPC (classify.v1, KServe v2, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 8001 8002

# Healthy once every model is loaded and warmed up (grpc.health.v1 SERVING); unhealthy while loading and
# draining. The start period covers CUDA start-up and warm-up. `|| exit 1`: classify exits 2 when it cannot
# connect, a status Docker reserves. With TLS, or another port, override it (docker run --health-cmd), e.g.
# against a plaintext --health-port. (DL3025 asks for JSON form, which has no `||`; a probe needs no signals.)
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD classify health --server 127.0.0.1:8001 || exit 1

# Exec form: the server is PID 1 and receives SIGTERM itself (NOT_SERVING, in-flight requests finish, exit 0).
# Arguments after the image name are passed on as flags, e.g. `docker run ... classify-service --workers 2`.
ENTRYPOINT ["classify-server"]
