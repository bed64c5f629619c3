-- 0005_payload_labels_search: serves ListJobs' `labels` and `where` filters (queries.py, ADR 0019).
--
-- GIN with jsonb_path_ops: the index answers containment (`payload @> '{"customer":{"id":42}}'`,
-- `labels @> '{"team":"a"}'`), which is how queries.py asks for every equality and `contains`
-- condition and every label. The other operators (ne, lt, le, gt, ge, exists) are checked on the
-- rows the other conditions (containment, queue, type, state, time) select. jsonb_path_ops rather
-- than the default jsonb_ops: smaller entries (one hash per path to a value, not one per key and
-- value), and containment is the only operator we ask of it.
-- Every update of a job row writes into every index (state is indexed, so no update is HOT):
-- fastupdate (the default) lets those inserts go to the pending list and be merged in bulk.
CREATE INDEX jobs_payload_idx ON jobs USING gin (payload jsonb_path_ops);
CREATE INDEX jobs_labels_idx ON jobs USING gin (labels jsonb_path_ops);
