"""`conveyor`: the command line for Conveyor's gRPC services (ADR 0016).

Every command talks to the producer (and, for history, the results service) through
ConveyorClient, prints a table for people or JSON for scripts (``--json``), and turns an error
into one line naming the gRPC code, never a traceback.
"""

from conveyor.common.cli.app import main

__all__ = ["main"]
