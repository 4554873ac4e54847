-- The outbox no longer notifies from inside the writing transaction: a
-- NOTIFY takes a database-wide lock at commit, which serialized the commits
-- of every transaction that wrote an event. The core wakes the relays after
-- commit instead (events.Kick: in-process at once, one coalesced NOTIFY on
-- gpuaas_outbox for the relays of other processes); relays still poll.
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
