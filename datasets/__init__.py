"""Dataset families. Every family builds a `DataBundle` whose datasets yield (uint8 tensor (C, H, W), label)."""
