-- 0003_projection_set_aside: events the projector could not fold because of their own data.
--
-- Only an error of the row itself (SQLSTATE class 22 data exception or 23 integrity
-- violation, see pgerrors.py), or an entry that is not a JobEvent at all, sets an event
-- aside; every other error is retried. One row per stream entry, written in the same
-- transaction as the rest of its batch, so the entry is acked only once it is either
-- projected or kept here. An operator lists, replays or discards them (ResultsService
-- ListSetAside, ReplaySetAside, DiscardSetAside); nothing is dropped on its own.
CREATE TABLE projection_set_aside (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue         text NOT NULL,
    -- "<queue>/<ULID>", or '' when the entry named none.
    job_id        text COLLATE "C" NOT NULL,
    -- The stream entry id, "<ms>-<seq>".
    entry_id      text NOT NULL,
    -- The entry's serialized conveyor.v1.JobEvent, as it was in the stream.
    event         bytea NOT NULL,
    -- '' when the entry could not be decoded (no SQL ran).
    sqlstate      text NOT NULL,
    error         text NOT NULL,
    set_aside_at  timestamptz NOT NULL DEFAULT now(),
    -- A replay that failed again: when, and how many times.
    replayed_at   timestamptz,
    replays       integer NOT NULL DEFAULT 0,
    -- A redelivered entry (a crash between commit and ack) finds its row instead of adding one.
    UNIQUE (queue, entry_id)
);
