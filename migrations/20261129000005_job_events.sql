-- Every change of a job's state or progress is announced, so API processes can stream it to
-- dashboards (GET /v1/jobs/{id}/events) without polling the table.
CREATE FUNCTION notify_job_event() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('modelpress_job_events', NEW.id::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify_event
    AFTER UPDATE OF state, progress_stage, progress_percent, cancel_requested ON jobs
    FOR EACH ROW EXECUTE FUNCTION notify_job_event();
