"""One registry from several processes: the SQLite lock, and on PostgreSQL the leader
election, the change pump, forwarding to the leader and the replicas' status (SPEC §8)."""
