"""POST /backward: gradients of our conv w.r.t. input, weight and bias, with parity against nn.Conv2d."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import BEARER_SECURITY
from app.routes.docs import ERROR_RESPONSES, request_body
from app.schemas import BACKWARD_EXAMPLE, BackwardResponse
from app.service import serve_conv

router = APIRouter()


@router.post(
    "/backward",
    summary="Conv2d backward with ours, checked against nn.Conv2d",
    openapi_extra={**request_body("BackwardRequest", BACKWARD_EXAMPLE), **BEARER_SECURITY},
    responses={200: {"model": BackwardResponse, "description": "The gradients, the parity report and timings"}, **ERROR_RESPONSES},
)
async def backward(request: Request) -> Response:
    """Body: /forward's plus grad_output (or a named loss), and return_output."""
    return await serve_conv(request, backward=True)
