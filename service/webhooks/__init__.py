"""Signed webhooks on RQ: a delivery is an RQ job on its own queue (``WEBHOOK_QUEUE``), made at admission as a
dependent of the generation job, retried by RQ's ``Retry`` with backoff, and sent by ``python -m service.webhooks``
(no torch).

- ``targets``: which URLs a webhook may reach (SSRF: ports and addresses are checked at submission and again at
  each delivery, and the connection goes to the checked address);
- ``signing``: Standard Webhooks signatures (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), with a
  secret per API key derived from ``WEBHOOK_SECRET`` (``GET /webhooks/secret``), two during a rotation;
- ``delivery``: what the API does: the deferred delivery written at admission, its state in ``GET /jobs/{id}``;
- ``sender``: what the delivery process does: the delivery job (one signed attempt, bounded in time and in what it
  reads, at most ``WEBHOOK_TENANT_CONCURRENCY`` per API key at once), and the sweep that releases deliveries of
  jobs that ended without doing so;
- ``__main__``: the delivery process (an RQ worker with RQ's scheduler for the retries, and metrics).
"""
