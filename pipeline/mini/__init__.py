"""The generated mini-AVA (written in the real AVA file layout) and its contact sheet. Imports ``pipeline.ava``,
numpy and Pillow; never torch."""
