"""Code every Conveyor service shares: settings, logging, Redis keys and scripts, gRPC bootstrap, client."""
