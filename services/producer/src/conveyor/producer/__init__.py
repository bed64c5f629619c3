"""Conveyor producer: the gRPC front door (Enqueue, EnqueueBatch, Watch, GetJob)."""
