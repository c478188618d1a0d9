-- Goal jobs (the advisor): the goal replaces the recipe (recipe holds JSON null), and the
-- candidates measured so far are kept on the row so pollers and the event stream see the search
-- while it runs.
ALTER TABLE jobs
    ADD COLUMN goal jsonb,
    ADD COLUMN candidates jsonb NOT NULL DEFAULT '[]'::jsonb;

DROP TRIGGER jobs_notify_event ON jobs;
CREATE TRIGGER jobs_notify_event
    AFTER UPDATE OF state, progress_stage, progress_percent, cancel_requested, candidates ON jobs
    FOR EACH ROW EXECUTE FUNCTION notify_job_event();
