"""Keyframe clips, the SlowFast backbone and its checkpoints, and extraction into the feature cache. Imports
``pipeline.ava``, ``cache`` and torch."""
