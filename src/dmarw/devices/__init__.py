"""Device models that reach guest memory by DMA address (one module per device)."""
