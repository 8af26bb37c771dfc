"""POST /forward: our conv's output, with parity against nn.Conv2d."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import BEARER_SECURITY
from app.routes.docs import ERROR_RESPONSES, request_body
from app.schemas import FORWARD_EXAMPLE, ForwardResponse
from app.service import serve_conv

router = APIRouter()


@router.post(
    "/forward",
    summary="Conv2d forward with ours, checked against nn.Conv2d",
    openapi_extra={**request_body("ForwardRequest", FORWARD_EXAMPLE), **BEARER_SECURITY},
    responses={200: {"model": ForwardResponse, "description": "The output, the parity report and timings"}, **ERROR_RESPONSES},
)
async def forward(request: Request) -> Response:
    """Body: see ForwardRequest. Tensors are nested lists, {shape, dtype, data} or {shape, dtype, b64}."""
    return await serve_conv(request, backward=False)
