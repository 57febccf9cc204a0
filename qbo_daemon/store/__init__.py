"""Storage: the SQLite repository, schema and migrations, the lock, encryption at rest."""
