"""stctx."""
