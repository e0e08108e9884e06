"""facegen HTTP API: validates requests, queues job specs for the GPU worker, serves status and artifacts.

Imports no torch: of our own code it uses only :mod:`facegen.contract`.
"""
