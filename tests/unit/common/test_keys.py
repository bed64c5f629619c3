from conveyor.common.keys import BANDS, queue_keys


def test_every_key_of_a_queue_shares_its_hash_tag() -> None:
    keys = queue_keys("emails")
    all_keys = [*keys.script_keys(), keys.idempotency("k")]
    assert len(keys.bands) == len(BANDS)
    assert all("{emails}" in k for k in all_keys)
    assert len(set(all_keys)) == len(all_keys)
    assert keys.band(9) == keys.bands[-1]


def test_the_worker_registry_shares_one_slot_and_no_queue_can_collide_with_it() -> None:
    from conveyor.common.keys import WORKERS, worker_key

    # A queue named like the registry's tag, and a worker named like a queue key's suffix.
    queue = queue_keys("registry")
    entry = worker_key("paused")
    assert "{registry}" in WORKERS and entry.startswith(WORKERS + ":")
    assert entry not in queue.script_keys() and not WORKERS.startswith("conveyor:{")
