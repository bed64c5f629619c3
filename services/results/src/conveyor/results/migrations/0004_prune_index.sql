-- 0004_prune_index: serves the prune loop (prune.py): finished jobs oldest first, across queues.
--
-- Partial on the final states (SUCCEEDED 5, FAILED 6, DEAD_LETTERED 7, CANCELLED 8: exactly the
-- rows with a finished_at), so a job's QUEUED and ACTIVE updates add nothing to it, and so that
-- only a query naming these states can use it: GetFinishedStats keeps reading
-- jobs_queue_finished_idx (queue first), which the planner would otherwise trade for this one.
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE state IN (5, 6, 7, 8);
