-- The role KEDA's postgresql scaler logs in as (TriggerAuthentication `segsvc-postgres` in
-- k8s/base/inference-worker-scaledobject.yaml). It may count jobs by their status and read
-- nothing else: no uploads, masks, API keys or webhook secrets.
--
-- Run it as the owner of the segsvc database after the first migration (the table must exist),
-- then give the role a password without writing one into a file or a shell history:
--   psql "postgresql://OWNER@HOST:5432/segsvc" -f ops/postgres/keda-scaler-role.sql
--   psql "postgresql://OWNER@HOST:5432/segsvc" -c '\password segsvc_keda'
-- Creating a role needs CREATEROLE (on a managed Postgres, its admin user). Running it again
-- changes nothing. A migration that rebuilt the jobs table would drop the grant: run it again.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'segsvc_keda') THEN
        CREATE ROLE segsvc_keda LOGIN;
    END IF;
END
$$;

-- KEDA asks every 5 seconds: a count held up by a lock or a slow disk gives up rather than
-- piling up connections behind it (KEDA then keeps the replica count it has, or runs the
-- ScaledObject's fallback of 2 workers after 3 failed polls; a scaler that cannot connect at
-- all when it is created gets no fallback: see docs/scaling.md).
ALTER ROLE segsvc_keda SET statement_timeout = '5s';

-- A column privilege: the scaler's `count(*) ... WHERE status IN (...)` needs no other column.
GRANT SELECT (status) ON jobs TO segsvc_keda;
