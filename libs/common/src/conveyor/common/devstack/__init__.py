"""Private Redis and PostgreSQL servers plus the `make up` supervisor for local development and tests."""
