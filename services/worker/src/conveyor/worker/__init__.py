"""Conveyor worker: runs jobs claimed from Redis streams with registered handlers.

Write handlers with :class:`conveyor.worker.handlers.Handlers`; see the README.
"""
