# GPU image of dreamfleet: Ray + the package, used as head, worker and job image. Build: docker build -t dreamfleet .
# For a CPU-only laptop image: docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu -t dreamfleet:cpu .
# With vLLM as the VLM passes' engine (--set vlm_engine=vllm): docker build --build-arg VLLM=1 -t dreamfleet:vllm .
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}
ARG VLLM=0

# Ray's images already run as the non-root `ray` user; saying so before WORKDIR makes BuildKit create it ray-owned,
# which the in-tree `pip install .` below needs.
USER ray
WORKDIR /home/ray/dreamfleet
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users engine ./engine
COPY --chown=ray:users ray_jobs ./ray_jobs

# Ray's images ship no torch: install the CUDA build first, so that installing the package never replaces it.
# vLLM pins its own torch (vllm 0.29.0: torch 2.13.0, torchvision 0.28.0, CUDA builds from PyPI), so the vLLM
# image takes that one instead.
RUN if [ "$VLLM" = 1 ]; then \
        pip install --no-cache-dir ".[vllm]"; \
    else \
        pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 && pip install --no-cache-dir .; \
    fi

# The driver's Prometheus endpoint (--metrics-port); Ray's own ports are declared by the KubeRay manifests.
EXPOSE 9101
ENTRYPOINT ["python", "-m", "ray_jobs"]
