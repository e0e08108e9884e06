"""The served model: networks, diffusion math and samplers, the pipeline, checkpoints and their manifest, image
helpers. Imports nothing of ours outside this package, and only what the worker image installs (tests/test_rooms.py)."""
