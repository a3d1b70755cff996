# syntax=docker/dockerfile:1
# The operator image: reconciles ModelPools into Deployments/Services and scales each tier.
#   docker build -f docker/operator.Dockerfile -t <registry>/foveal/operator:0.1.0 .
# The foveal chart runs it as `foveal operator run --namespace <ns> --router-metrics <url> ...`
# (operator.image in helm/foveal/values.yaml).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/foveal
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY foveal ./foveal
RUN /opt/foveal/bin/pip install -c constraints.txt '.[operator]'
RUN /opt/foveal/bin/python -c "import foveal.operator.runner" \
 && /opt/foveal/bin/foveal operator run --help >/dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/foveal/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 foveal \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/foveal --create-home foveal
COPY --from=build /opt/foveal /opt/foveal
WORKDIR /var/lib/foveal
USER 10001:10001
ENTRYPOINT ["foveal"]
CMD ["operator", "run", "--help"]
