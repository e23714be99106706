"""DecMem networks: plain single-process PyTorch (no torch.distributed, no deepspeed)."""
