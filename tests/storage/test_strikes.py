"""Failed sign-ins counted in the database (storage/strikes.py), on SQLite and PostgreSQL (conftest.py)."""

from __future__ import annotations

import threading

from bearerbridge.throttle import ThrottleRules, keys_of

RULES = ThrottleRules(free_failures=1, first_delay=1.0, max_delay=4.0, account_block_after=3,
                      address_block_after=5, block=60, forget_after=600)


def attempt(store, keys, ok, now):
    with store.transaction():
        wait = store.begin_attempts(keys, now, RULES)
    if wait:
        return wait, None
    with store.transaction():
        return 0, store.settle_attempts(keys, ok, now, RULES)


def test_failures_delay_then_block_the_account_and_a_success_forgives_it(store):
    keys = keys_of("alice", "192.0.2.7", RULES)
    assert [attempt(store, keys, False, 10.0)[1].delay for _ in range(2)] == [0, 1]
    wait, failed = attempt(store, keys, False, 10.0)
    assert failed.delay == 2 and [k.value for k in failed.blocked] == ["alice"]
    assert attempt(store, keys, True, 11.0) == (59, None)  # blocked: refused unchecked, even the right password
    other = keys_of("bob", "192.0.2.7", RULES)
    assert attempt(store, other, True, 11.0)[0] == 0  # the address is not blocked yet
    assert attempt(store, keys, True, 71.0)[0] == 0  # the block ended by itself
    assert attempt(store, keys[:1], False, 72.0)[1].delay == 0  # and the account's count with it


def test_the_address_is_blocked_for_every_account(store):
    for i in range(5):
        attempt(store, keys_of(f"user{i}", "198.51.100.3", RULES), False, 5.0)
    assert attempt(store, keys_of("someone-else", "198.51.100.3", RULES), True, 6.0)[0] == 59
    assert attempt(store, keys_of("someone-else", "198.51.100.4", RULES), True, 6.0)[0] == 0


def test_attempts_being_checked_count_so_that_guesses_sent_at_once_are_not_all_checked(store):
    keys = keys_of("carol", None, RULES)
    admitted = []
    for _ in range(6):  # six guesses arrive before any is checked
        with store.transaction():
            admitted.append(store.begin_attempts(keys, 1.0, RULES) == 0)
    assert admitted == [True, True, True, False, False, False]


def test_concurrent_failures_at_several_instances_are_all_counted(store):
    keys = keys_of("dave", "203.0.113.9", ThrottleRules(account_block_after=0, address_block_after=0))

    def fail_ten():
        for _ in range(10):
            attempt(store, keys, False, 1.0)

    threads = [threading.Thread(target=fail_ten) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with store.transaction():
        assert store.settle_attempts(keys, False, 1.0, RULES).delay == RULES.max_delay
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT failures FROM throttle_strikes").scalars().all()
    assert sorted(rows) == [40, 40]  # no update lost


def test_no_name_or_address_is_stored_in_clear_and_purge_drops_rows_that_no_longer_count(store):
    attempt(store, keys_of("erin", "192.0.2.55", RULES), False, 1.0)
    with store.engine.connect() as conn:
        dumped = repr(conn.exec_driver_sql("SELECT * FROM throttle_strikes").all())
    assert "erin" not in dumped and "192.0.2" not in dumped
    with store.transaction():
        assert store.purge_expired() == 2  # both rows expired long ago (now is 1970 + 1 s)
