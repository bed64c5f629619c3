from conveyor.common.keys import BANDS, queue_keys


def test_every_key_of_a_queue_shares_its_hash_tag() -> None:
    keys = queue_keys("emails")
    all_keys = [*keys.script_keys(), keys.idempotency("k")]
    assert len(keys.bands) == len(BANDS)
    assert all("{emails}" in k for k in all_keys)
    assert len(set(all_keys)) == len(all_keys)
    assert keys.band(9) == keys.bands[-1]
