"""The `nanovllm` command line (Typer + Rich) over nanovllm_mlx's public API."""
