"""What is served: the model, its interpreter, the defense with its public settings, and the model card."""

from __future__ import annotations

from fastapi import APIRouter

from defense.gate import MisinformationGate

from ..card import model_card
from ..dependencies import CallerDep, RuntimeDep
from ..runtime import Runtime
from ..schemas import DefenseInfo, ErrorResponse, ModelInfo, ModelsResponse

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def list_models(runtime: RuntimeDep, caller: CallerDep) -> ModelsResponse:
    return ModelsResponse(models=[_info(runtime)])


@router.get(
    "/v1/models/{model_name}",
    response_model=ModelInfo,
    responses={status: {"model": ErrorResponse} for status in (401, 404, 503)},
)
async def get_model(model_name: str, runtime: RuntimeDep, caller: CallerDep) -> ModelInfo:
    """The served model, as ``/v1/models`` lists it; 404 for any other name."""
    runtime.check_served(model_name)
    return _info(runtime)


def _info(runtime: Runtime) -> ModelInfo:
    defense = runtime.ready_defense()
    meta = runtime.meta
    gated = isinstance(defense, MisinformationGate)
    return ModelInfo(
        name=runtime.model_name,
        version=runtime.model_version,
        arch=meta.arch,
        dataset=meta.dataset,
        classes=meta.classes,
        input_shape=meta.input_shape,
        interpreter=runtime.interpreter_name,
        defense=DefenseInfo(name=runtime.defense_name, settings=defense.public_settings()),
        card=model_card(meta, runtime.look, runtime.image_limits, defense=runtime.defense_name, gated=gated),
    )
