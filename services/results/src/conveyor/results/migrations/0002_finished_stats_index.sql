-- 0002_finished_stats_index: serves GetFinishedStats (queries.py finished_stats).
--
-- Counting a queue's jobs finished in the last hour, per final state, reads only this index
-- (an index-only scan of the (queue, finished_at) range, the state from INCLUDE). Partial:
-- only finished rows are in it, so a job's QUEUED and ACTIVE updates add nothing to it.
CREATE INDEX jobs_queue_finished_idx ON jobs (queue, finished_at) INCLUDE (state) WHERE finished_at IS NOT NULL;
