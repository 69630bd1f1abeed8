"""Where the registry's state is kept: the tables, the store, and the one writer.

- ``tables``: the schema SQLAlchemy and the migrations share;
- ``store``: loads the catalogue and change log, writes a batch in one transaction
  (fenced among replicas);
- ``batch_sql``, ``sqlite_writer``: a batch's statements, and the SQLite thread that
  runs them on a plain ``sqlite3`` connection;
- ``journal``: group commit, the single writer between the catalogue and the store.
"""
