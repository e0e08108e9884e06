"""The torch-free wire contract between the API, the webhook sender and the worker: job specs and their field types,
connection policy, artifact store, fair queue, the cost of a job in work units. Imports nothing of ours outside this
package (tests/test_rooms.py)."""
