"""Predictions of a trained model on any video, frames folder or AVA split, and pictures of them (``stctx predict``)."""
