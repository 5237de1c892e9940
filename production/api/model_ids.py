"""The model ids a request may name: aliases of what serves now (the base model with the
current adapter), their /v1/models cards, and the 404 for any other name."""

from __future__ import annotations

from typing import Any

from candidates import RegistryError
from production.api.errors import ApiError
from production.api.protocol import ModelCard
from production.api.service import Service


def served_model(engine: Any) -> str:
    """The model id that answers now: the current adapter, or the base model."""
    return f"whetstone/{engine.adapter_id}" if engine.adapter_id else engine.base_model_name


def check_model(service: Service, name: str | None) -> None:
    """A request names what serves (or an alias of it); anything else is refused, 404."""
    engine = service.engine
    if name is None or name in ("whetstone", engine.base_model_name, served_model(engine)):
        return
    if engine.adapter_id and name == engine.adapter_id:
        return
    adapter = name.removeprefix("whetstone/")
    known = service.registry.path(adapter).is_dir() if _safe_id(service, adapter) else False
    if known:
        raise ApiError(
            404,
            f"model {name!r} is a candidate but does not serve now ({served_model(engine)} "
            f"does): promote it to chat with it",
            param="model",
            code="model_not_found",
        )
    names = dict.fromkeys(["whetstone", engine.base_model_name, served_model(engine)])
    raise ApiError(
        404,
        f"model {name!r} does not exist here: use one of {', '.join(map(repr, names))}, each "
        "an alias of what serves now (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def _safe_id(service: Service, candidate_id: str) -> bool:
    try:
        service.registry.validate_id(candidate_id)
    except (RegistryError, ValueError):
        return False
    return True


def _model_card(service: Service, model_id: str, adapter_id: str | None) -> ModelCard:
    return ModelCard(
        id=model_id,
        object="model",
        created=int(service.started_at.timestamp()),
        owned_by="whetstone",
        adapter_id=adapter_id,
        **({"current": True} if adapter_id else {}),
    )


def model_cards(service: Service) -> list[ModelCard]:
    """What a request may name; each is an alias of what serves now (base + current
    adapter): `whetstone`, the base model's name, and `whetstone/<adapter id>`."""
    engine = service.engine
    adapter = engine.adapter_id
    cards = [
        _model_card(service, "whetstone", adapter),
        _model_card(service, engine.base_model_name, adapter),
    ]
    if adapter:
        cards.append(_model_card(service, f"whetstone/{adapter}", adapter))
    return cards
