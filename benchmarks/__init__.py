"""Benchmarks of mlx-qwen-image: speed (`bench`, FLOP counts in `flops`) and the quantization recipe."""
