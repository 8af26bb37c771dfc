"""OpenAPI pieces shared by the compute routes: the declared request body and the error responses.

The routes read raw bytes (orjson, bulk numpy), so FastAPI does not see a body parameter; the body
is declared here by reference to ForwardRequest / BackwardRequest, which app/main.py adds to the
schema's components.
"""

from __future__ import annotations

from typing import Any

from app.schemas import Detail

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Detail, "description": "Malformed JSON or base64"},
    401: {"model": Detail, "description": "Missing or wrong API key (only when CONV_API_KEY is set)"},
    408: {"model": Detail, "description": "The body did not arrive within CONV_BODY_TIMEOUT_S"},
    413: {"model": Detail, "description": "Over a limit: body bytes, elements per tensor, MACs per request, reference MACs"},
    415: {"model": Detail, "description": "Content-Type other than application/json, or a Content-Encoding"},
    422: {"model": Detail, "description": "Invalid values; detail[].loc names the field"},
    503: {"model": Detail, "description": "Queue full or device unusable; see Retry-After"},
    504: {"model": Detail, "description": "Past the request deadline"},
    507: {"model": Detail, "description": "The device ran out of memory for this request"},
}


def request_body(model_name: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model_name}"},
                    "examples": {
                        "seed": {"summary": "The seed notebook's case: 2x1x3x3 input, 2 filters 3x3, padding 1", "value": example}
                    },
                }
            },
        }
    }
