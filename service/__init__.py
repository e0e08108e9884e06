"""facegen HTTP API: validates requests, queues job specs for the GPU worker, serves status and artifacts.

Imports no torch: of the worker package it uses only ``worker.spec``.
"""
