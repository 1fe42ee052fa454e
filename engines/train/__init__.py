"""Offline training of scopecast engines (torch): configs, data, losses, the loop, checkpoints."""
