"""Storage on PostgreSQL: a second implementation beside SQLite, for several daemons.

``database.py`` (the asyncpg pool, the LISTEN connection, errors as
:class:`StorageError`), ``schema.py`` (versioned migrations under an advisory
lock), ``rows.py`` (rows as values, encrypted exactly as on SQLite),
``accounts.py`` (the accounts table: reads, compare-and-swap writes, upserts),
``states.py`` (OAuth states) and ``storage.py`` (:class:`PostgresStorage`, the
same methods as the SQLite ``Storage``).
"""
