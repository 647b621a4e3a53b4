"""Tensor parallelism over MLX's distributed backend: one model across several processes.

Rank 0 runs the engine (parallel/runner.py); ranks 1..N-1 run parallel/worker.py; each step
travels as a compact record (parallel/records.py) over MLX's collectives
(parallel/channel.py); parallel/group.py starts the ranks and watches them.
"""
