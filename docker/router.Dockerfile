# syntax=docker/dockerfile:1
# The router image: the OpenAI-compatible gateway and the gRPC router in one process.
#   docker build -f docker/router.Dockerfile -t <registry>/foveal/router:0.1.0 .
# The foveal chart runs it as `foveal router serve --config /etc/foveal/config.yaml`
# (router.image in helm/foveal/values.yaml).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/foveal
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY foveal ./foveal
RUN /opt/foveal/bin/pip install -c constraints.txt '.[router]'
# Fail the build, not the pod, when the extra lacks what the router imports in a cluster
# (the kubernetes client watches the ModelPools; psycopg talks to PostgreSQL).
RUN /opt/foveal/bin/python -c "import foveal.router.app, kubernetes, psycopg" \
 && /opt/foveal/bin/foveal router serve --help >/dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/foveal/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 foveal \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/foveal --create-home foveal
COPY --from=build /opt/foveal /opt/foveal
WORKDIR /var/lib/foveal
# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8080 50051
ENTRYPOINT ["foveal"]
CMD ["router", "serve", "--config", "/etc/foveal/config.yaml"]
