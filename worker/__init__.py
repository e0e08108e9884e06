"""The GPU worker: loads a checkpoint once and serves generation jobs from Redis (RQ).

Importing this package is free of side effects; the service imports only :mod:`worker.spec`.
"""
