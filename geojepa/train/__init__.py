"""Stage 4: JEPA training (imports only torch, numpy and pyarrow at module top)."""
