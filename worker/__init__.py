"""The GPU worker: loads a checkpoint once and serves generation jobs from Redis (RQ).

Importing this package is free of side effects. It builds on :mod:`facegen.contract` and :mod:`facegen.model` only.
"""
