-- The MLflow tracking database is created by POSTGRES_DB; MLflow's basic-auth users and Prefect get
-- their own databases on the same server. Runs on the first start of an empty volume only: on an
-- existing one, create them by hand (`CREATE DATABASE mlflow_auth;`).
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
