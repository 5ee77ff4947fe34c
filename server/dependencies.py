"""FastAPI dependencies shared by the routers: the app's runtime, its data plane and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .auth import ANONYMOUS, Caller
from .data_plane import DataPlane
from .errors import ApiError
from .runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="API key, when the server is configured with keys")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_data_plane(request: Request) -> DataPlane:
    return request.app.state.data_plane


DataPlaneDep = Annotated[DataPlane, Depends(get_data_plane)]


def authenticate(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """``Authorization: Bearer <key>``; 401 when keys are configured and none of them is given."""
    if not runtime.keys.enabled:
        return Caller(ANONYMOUS)
    kid = runtime.keys.identify(credentials.credentials) if credentials is not None else None
    if kid is None:
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer <key>)",
            field="Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Caller(kid)


CallerDep = Annotated[Caller, Depends(authenticate)]
