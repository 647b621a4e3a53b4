"""Scheduling and blocks, plain Python: a request's sequences, the scheduler that plans each
step and moves them on, the block manager with its prefix cache, and a step's records."""
