"""Generated from protos/conveyor/v1; do not edit: make proto."""
