# syntax=docker/dockerfile:1
# The reference pool image: one tier of the Foveal reference VLM on CPU (`foveal pool serve`).
#   docker build -f docker/pool.Dockerfile -t <registry>/foveal/pool:0.1.0 .
# The operator starts it for each ModelPool with backend: reference (poolImages.reference in
# helm/foveal/values.yaml) as `foveal pool serve --tier <t> --mechanism <m> --host 0.0.0.0
# --port <p>`. vLLM tiers use vLLM's own image instead.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# constraints.txt pins torch; this index serves that version's CPU build (+cpu), which pip
# prefers over the registry's CUDA build of the same version (GBs the pool never uses).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/foveal
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY foveal ./foveal
RUN /opt/foveal/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt '.[pool]'
RUN /opt/foveal/bin/python -c "import sys, torch; sys.exit(f'CUDA build of torch {torch.__version__}: check TORCH_INDEX_URL' if torch.version.cuda else 0)" \
 && /opt/foveal/bin/foveal pool serve --help >/dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/foveal/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 foveal \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/foveal --create-home foveal
COPY --from=build /opt/foveal /opt/foveal
WORKDIR /var/lib/foveal
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["foveal"]
CMD ["pool", "serve", "--help"]
