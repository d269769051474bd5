"""The HTTP API: validates, starts/updates/queries workflows, reads SQL. Never sends mail."""
