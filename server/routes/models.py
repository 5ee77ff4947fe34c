"""What is served: the models, each with its interpreter, the defense with its public settings, and the model card."""

from __future__ import annotations

from fastapi import APIRouter

from deepdefense.defense.gate import MisinformationGate

from ..card import model_card
from ..dependencies import CallerDep, DataPlaneDep
from ..runtime import ModelRuntime
from ..schemas import DefenseInfo, ErrorResponse, ModelInfo, ModelsResponse

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def list_models(data_plane: DataPlaneDep, caller: CallerDep) -> ModelsResponse:
    """Every served model, the default (the first) first."""
    return ModelsResponse(models=[_info(model) for model in data_plane.models()])


@router.get(
    "/v1/models/{model_name}",
    response_model=ModelInfo,
    responses={status: {"model": ErrorResponse} for status in (401, 404, 503)},
)
async def get_model(model_name: str, data_plane: DataPlaneDep, caller: CallerDep) -> ModelInfo:
    """A served model, as ``/v1/models`` lists it; 404 for any other name."""
    return _info(data_plane.model(model_name, field="model_name"))


def _info(model: ModelRuntime) -> ModelInfo:
    defense = model.ready_defense()
    meta = model.meta
    gated = isinstance(defense, MisinformationGate)
    return ModelInfo(
        name=model.model_name,
        version=model.model_version,
        arch=meta.arch,
        dataset=meta.dataset,
        classes=meta.classes,
        input_shape=meta.input_shape,
        interpreter=model.interpreter_name,
        defense=DefenseInfo(name=model.defense_name, settings=defense.public_settings()),
        card=model_card(meta, model.look, model.image_limits, defense=model.defense_name, gated=gated),
    )
