# The image of every SuperExec in docker-compose.yml: Flower's SuperExec with this project and its
# dependencies installed, so it can run the malicious ServerApp and the ClientApps. Build context:
# the repository root (docker compose does this with `up --build`).
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

# Default: PyPI's torch (CUDA-enabled on x86-64, so the GPU override works). A smaller CPU-only image:
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=

WORKDIR /app
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app attacker attacker
COPY --chown=app:app clients clients
COPY --chown=app:app fl_sim fl_sim
# flwr comes with the base image, pinned; reinstalling it (with the simulation extra's Ray) would unpin it.
RUN sed -i '/"flwr\[simulation\]/d' pyproject.toml \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
         python -m pip install --no-cache-dir torch torchvision --index-url "$TORCH_INDEX_URL"; \
       fi \
    && python -m pip install --no-cache-dir . \
    && mkdir -p /app/out /app/data

ENTRYPOINT ["flower-superexec"]
