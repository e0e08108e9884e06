"""The routers, one per resource, in the order the app includes them."""

from __future__ import annotations

from service.api.routes import docs, edit, events, health, jobs, metrics, models, playground

ROUTERS = [module.router for module in (jobs, edit, events, models, health, metrics, playground, docs)]
