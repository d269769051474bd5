# mailqueue image: the API by default; `python worker.py`, `mailqueue migrate` and
# `python -m devstack.catcher` run from the same image (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAILQUEUE_TEMPLATES_DIR=/app/templates
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mailqueue ./mailqueue
COPY workflows ./workflows
COPY activities ./activities
COPY api ./api
COPY devstack ./devstack
COPY worker.py ./
COPY templates ./templates
RUN pip install . && python -m compileall -q /app \
    && useradd --system --uid 10001 --home-dir /app mailqueue
USER mailqueue
EXPOSE 8000
# --timeout-keep-alive: mailqueue.config.HTTP_KEEP_ALIVE_SECONDS (clients close idle connections first)
CMD ["uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-keep-alive", "75"]
