"""Conveyor results: projects job events into PostgreSQL and serves ResultsService."""
