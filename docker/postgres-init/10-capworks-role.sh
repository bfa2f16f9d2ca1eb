#!/bin/sh
# Run once by the postgres image, as its superuser, on an empty data directory: creates the role
# capworks connects as, a plain one (no superuser, createdb, createrole or replication) that
# owns its database, so the app can migrate its own tables and nothing else on the server.
# The password reaches psql through its environment (\getenv), never its argv.
set -eu
: "${CAPWORKS_DB_USER:?set CAPWORKS_DB_USER}" "${CAPWORKS_DB_NAME:?set CAPWORKS_DB_NAME}"
: "${CAPWORKS_DB_PASSWORD:?set CAPWORKS_DB_PASSWORD}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    --set=app_user="$CAPWORKS_DB_USER" --set=app_db="$CAPWORKS_DB_NAME" <<'SQL'
\getenv app_password CAPWORKS_DB_PASSWORD
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
CREATE DATABASE :"app_db" OWNER :"app_user";
REVOKE ALL ON DATABASE :"app_db" FROM PUBLIC;
SQL
