-- 0004_prune_index: serves the prune loop (prune.py): finished jobs oldest first, across queues.
--
-- Partial, as jobs_queue_finished_idx: only finished rows are in it, so a job's QUEUED and
-- ACTIVE updates add nothing; a job adds one entry when it finishes.
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;
