-- One PostgreSQL server, one database per service (the official image runs this once, on an empty volume).
-- The image's POSTGRES_DB creates `mlflow`; these are the others.
CREATE DATABASE prefect;
CREATE DATABASE distill;  -- the ledger: claims, deliveries, alias history (DISTILL_LEDGER_URI)
