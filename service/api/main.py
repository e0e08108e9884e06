"""The routers, one per resource, in the order the app includes them."""

from __future__ import annotations

from service.api.routes import docs, events, health, jobs, metrics, models, playground

ROUTERS = [module.router for module in (jobs, events, models, health, metrics, playground, docs)]
