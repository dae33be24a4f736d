"""Training loops: the backbone fine-tuned end to end on frames, heads trained from the feature cache, and the
optimiser and schedule code they share. Imports ``pipeline.ava``, ``pipeline.features``, ``cache`` and ``heads``."""
