"""The small routes: the model list (/v1/models), health and Prometheus metrics, and the web chat page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from .server_state import ServerState, State, authorized

WEB = Path(__file__).parent / "web"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'", "X-Content-Type-Options": "nosniff"}

models = APIRouter(dependencies=[Depends(authorized)])
health = APIRouter()  # open, like the page: load balancers and Prometheus send no key
web = APIRouter()


def model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "apertus",
            "max_model_len": state.engine.max_context}


@models.get("/v1/models")
async def list_models(state: State):
    return {"object": "list", "data": [model_card(state)]}


@models.get("/v1/models/{name:path}")
async def get_model(name: str, state: State):
    state.check_model(name)
    return model_card(state)


@health.get("/health")
async def get_health(state: State):
    value = state.metrics.registry.get_sample_value
    return {"status": "ok", "model": state.model_name, "waiting": int(value("apertus_requests_waiting")),
            "running": int(value("apertus_requests_running"))}


@health.get("/metrics")
async def get_metrics(state: State):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@web.get("/")
async def page():
    return FileResponse(WEB / "index.html", headers=PAGE_HEADERS)
