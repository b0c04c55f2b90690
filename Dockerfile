# torchrig image: one CUDA profile's hash-locked PyTorch stack on NVIDIA's CUDA base, run as a non-root user.
# Build it with `make build [CUDA=12.8] [CA_BUNDLE=/path/to/ca.pem]`: env/rig/docker.py passes the profile's
# base image, lock file and pins from env/rig/profiles.py. The defaults below are the CUDA 12.1 profile's.
# There is no `# syntax=` line on purpose: the Dockerfile frontend built into BuildKit since Docker 20.10
# has every feature used here (RUN --mount), and a syntax line would pull a frontend image from a registry.

ARG BASE_IMAGE=nvidia/cuda:12.1.1-base-ubuntu22.04
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive

# System Python in a venv. Debs and apt lists live in BuildKit cache mounts, not in the layer. NVIDIA's apt
# source is removed: nothing is installed from it, and it would add a host every build depends on.
# The optional `ca_bundle` build secret (a PEM bundle trusted for TLS-intercepting proxies) is used
# when present and never stored in the image.
# DL3008: apt versions are not pinned because Ubuntu's archive drops superseded versions (a pin breaks
# the build within weeks); the base tag fixes the release, and every Python package is hash-locked.
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=secret,id=ca_bundle \
    rm -f /etc/apt/sources.list.d/cuda*.list /etc/apt/apt.conf.d/docker-clean \
    && if [ -s /run/secrets/ca_bundle ]; then \
        echo 'Acquire::https::CAInfo "/run/secrets/ca_bundle";' > /etc/apt/apt.conf.d/99torchrig-build-ca; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -f /etc/apt/apt.conf.d/99torchrig-build-ca \
    && python3 -m venv /opt/venv

# Fixed UID 1000 so host directories can be handed to it. compose may run the container as the host
# user's uid instead (env/rig/docker.py decides), so the home directory, where torch and triton keep their
# caches, is writable by any uid.
RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash torchrig \
    && chmod 1777 /home/torchrig

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/torchrig \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The profile's lock, every wheel checked against its hash; wheels only, so nothing is compiled. The pip
# cache is a BuildKit cache mount, kept out of the image and reused by the next build.
ARG LOCK_FILE=requirements.txt
COPY ${LOCK_FILE} /opt/torchrig/requirements.lock
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && pip install --require-hashes --only-binary=:all: -r /opt/torchrig/requirements.lock

# Project code last: editing it rebuilds only the layers below, never the torch install.
WORKDIR /workspace
COPY . /workspace
RUN install -d -o 1000 -g 1000 /workspace/data /workspace/runs /workspace/checkpoints

# Build-time self-check: the build fails unless the installed torch reports the profile's CUDA and loads
# its NCCL. These arguments are declared here, after the install, so a changed pin reruns only this check.
ARG TORCHRIG_CUDA=12.1
ARG TORCHRIG_NCCL=2.20.5
ARG TORCHRIG_TORCH=2.4.1
RUN python -m env.rig.profiles verify --cuda "$TORCHRIG_CUDA" --nccl "$TORCHRIG_NCCL" --torch "$TORCHRIG_TORCH"

# Provenance, as OCI labels and as variables the doctor and run manifests read.
ARG BASE_IMAGE
ARG SOURCE_URL=""
ARG REVISION=unknown
ARG VERSION=unknown
LABEL org.opencontainers.image.title="torchrig" \
      org.opencontainers.image.description="Containerized multi-GPU PyTorch training rig" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.torchrig.cuda-profile="${TORCHRIG_CUDA}"
ENV TORCHRIG_GIT_COMMIT=${REVISION} \
    TORCHRIG_VERSION=${VERSION} \
    TORCHRIG_CUDA_PROFILE=${TORCHRIG_CUDA} \
    TORCHRIG_LOCK=/opt/torchrig/requirements.lock \
    TORCHRIG_RUNTIME=docker

USER 1000:1000
CMD ["bash"]
