"""Conveyor dashboard: a small web service that shows queues, jobs and workers through the gRPC APIs."""
