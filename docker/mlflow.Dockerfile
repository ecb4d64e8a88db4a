# The MLflow tracking server with its basic-auth app (mlflow[auth]) and the Postgres and S3 drivers.
# Its entrypoint, mlflow_server.py, writes the auth config from the environment and starts the server.
FROM python:3.11-slim-bookworm

ARG MLFLOW_VERSION=3.17.2

ENV PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.34"

COPY mlflow_server.py mlflow_users.py /opt/sftflow/
RUN useradd --create-home --uid 1000 mlflow
USER 1000

EXPOSE 5000
ENTRYPOINT ["python", "/opt/sftflow/mlflow_server.py"]
