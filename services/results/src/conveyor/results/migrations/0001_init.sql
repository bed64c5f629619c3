-- 0001_init: the jobs projection and the per-job event history.
--
-- `jobs` holds one row per job id whatever is replayed (invariant 2, DESIGN.md): the
-- projector upserts it with a monotonic guard on (last_event_ms, last_event_seq), the
-- Redis stream id of the last event applied to the row.
-- `job_events` keeps every event, packed per job and batch, for ListJobEvents.

CREATE TABLE jobs (
    -- "<queue>/<ULID>"; C collation so ordering and keyset comparisons are bytewise.
    job_id            text COLLATE "C" PRIMARY KEY,
    queue             text NOT NULL,
    -- NULL until an event carrying the job itself (QUEUED or a final event) is projected.
    type              text,
    state             smallint NOT NULL,
    priority          smallint,
    payload           jsonb,
    result            jsonb,
    -- {"message": ..., "kind": ..., "retryable": ...}
    error             jsonb,
    progress_percent  double precision,
    progress_message  text,
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer,
    -- The serialized conveyor.v1.RetryPolicy: read back whole, never queried.
    retry             bytea,
    timeout_ms        bigint,
    labels            jsonb,
    idempotency_key   text,
    worker            text,
    -- From the job when known, else the time in the ULID: never NULL, so keyset paging is total.
    created_at        timestamptz NOT NULL,
    run_at            timestamptz,
    started_at        timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL,
    -- Stream id of the last event applied: later events win, replays of older ones are no-ops.
    last_event_ms     bigint NOT NULL,
    last_event_seq    bigint NOT NULL,
    -- Stream id of the latest QUEUED or DELAYED event: only one newer than a FAILED or
    -- DEAD_LETTERED outcome may reopen the job (re-queued dead letters).
    queued_event_ms   bigint NOT NULL DEFAULT 0,
    queued_event_seq  bigint NOT NULL DEFAULT 0
);

-- ListJobs: every filter pages newest first by (created_at DESC, job_id DESC); the indexes are
-- ascending and scanned backwards, which serves the same order.
-- `state` changes on every update, so every update of a row inserts into every index (no HOT):
-- the state index is partial, holding only the states a listing needs it for. QUEUED (the
-- newest jobs, found at once by a backward scan of jobs_created_idx) and SUCCEEDED (most
-- jobs) are left out, so a job's usual life (QUEUED, then SUCCEEDED) adds nothing to it.
-- queries.py writes the state as a literal so that the planner can match this predicate.
CREATE INDEX jobs_created_idx ON jobs (created_at, job_id);
CREATE INDEX jobs_queue_created_idx ON jobs (queue, created_at, job_id);
CREATE INDEX jobs_state_created_idx ON jobs (state, created_at, job_id) WHERE state NOT IN (1, 5);
CREATE INDEX jobs_type_created_idx ON jobs (type, created_at, job_id);

-- One row per job per projected batch: the events of that job the batch carried (usually one
-- or two), packed as records of (event_ms int8, event_seq int8, length int4, serialized
-- conveyor.v1.JobEvent as it was in the stream), in stream-id order. `first_*`/`last_*` are
-- the stream ids of the first and last record. A replay whose batch boundaries differ may
-- store an event twice (in two rows, or appended to a row with the same first id): readers
-- merge the rows of a job by event id (queries.py), so every event is returned exactly once.
CREATE TABLE job_events (
    job_id     text COLLATE "C" NOT NULL,
    first_ms   bigint NOT NULL,
    first_seq  bigint NOT NULL,
    last_ms    bigint NOT NULL,
    last_seq   bigint NOT NULL,
    events     bytea NOT NULL,
    PRIMARY KEY (job_id, first_ms, first_seq)
);
