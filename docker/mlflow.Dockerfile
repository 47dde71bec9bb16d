# The MLflow tracking server of the compose stack: the official image plus the PostgreSQL driver and the S3
# client it needs, pinned and installed once at build time (not at every start).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.8
COPY docker/check-env.sh /usr/local/bin/check-env
# The backend store URI holds the database password: it comes from the environment
# (MLFLOW_BACKEND_STORE_URI, read by `mlflow server`), never the command line, and placeholders are refused.
ENTRYPOINT ["/bin/sh", "/usr/local/bin/check-env", "MLFLOW_BACKEND_STORE_URI", "AWS_SECRET_ACCESS_KEY", "--"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
