# diffusion_lab training image: CUDA runtime, the locked environment installed by uv, a non-root user.
# Build: docker build -t diffusion_lab .
# Run:   docker run --gpus all -v $PWD/outputs:/app/outputs diffusion_lab trainer=gpu precision=bf16-mixed
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    PATH="/app/.venv/bin:${PATH}"

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates make \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m pip install --no-cache-dir --break-system-packages uv==0.13.9

RUN useradd --create-home --uid 1000 dlab
WORKDIR /app
RUN chown dlab:dlab /app
USER 1000:1000

# Dependencies first (cached layer), then the project itself.
COPY --chown=dlab:dlab pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY --chown=dlab:dlab diffusion_lab ./diffusion_lab
COPY --chown=dlab:dlab conf ./conf
RUN uv sync --frozen --no-dev

ENTRYPOINT ["dlab-train"]
