"""Embedding sets: upload a safetensors file (raw body or multipart `file`), read its summary."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from oal_shared.errors import EmbeddingSetError
from oal_synth.api.deps import Authorized, StoreDep
from oal_synth.api.errors import APIError
from oal_synth.api.schemas import EmbeddingSetOut, ErrorOut

router = APIRouter(prefix="/v1/embedding-sets", tags=["embedding-sets"])

RAW_TYPE = "application/octet-stream"
MULTIPART_TYPE = "multipart/form-data"

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "A safetensors embedding set: tensors `embeddings` float32 (N, D) and `labels` int64 "
        "(N,); metadata `space`, `class_names` (JSON list), `source`, and optionally `schema_version` "
        '("1"; a file without it is read as version 1).',
        "content": {
            RAW_TYPE: {"schema": {"type": "string", "format": "binary"}},
            MULTIPART_TYPE: {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=EmbeddingSetOut,
    dependencies=[Authorized],
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": EmbeddingSetOut, "description": "An identical set was stored before (same id)"},
        400: {"model": ErrorOut, "description": "Malformed multipart body"},
        401: {"model": ErrorOut},
        413: {"model": ErrorOut, "description": "Body larger than OAL_MAX_BODY_BYTES"},
        415: {"model": ErrorOut},
        422: {"model": ErrorOut, "description": "Not a valid embedding set; the message names the field"},
    },
    summary="Upload an embedding set (stored by content id)",
)
async def upload_embedding_set(request: Request, response: Response, store: StoreDep) -> dict:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == MULTIPART_TYPE:
        data, name = await _read_multipart_file(request)
    elif content_type in (RAW_TYPE, ""):
        data, name = await request.body(), "upload"  # the body-limit middleware caps what is read
    else:
        raise APIError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type!r} is not accepted; send the safetensors file as {RAW_TYPE} "
            f"or as the field 'file' of {MULTIPART_TYPE}",
            field="body",
        )
    if not data:
        raise APIError(422, "invalid_embedding_set", "the upload is empty; send a safetensors file", field="file")
    try:
        summary = await run_in_threadpool(store.put_bytes, data, name)
    except EmbeddingSetError as exc:
        raise APIError(422, "invalid_embedding_set", str(exc), field="file") from None
    response.headers["Location"] = f"/v1/embedding-sets/{summary['id']}"
    if not summary["created"]:
        response.status_code = status.HTTP_200_OK
    return summary


async def _read_multipart_file(request: Request) -> tuple[bytes, str]:
    form = await request.form(max_files=1, max_fields=10)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(
                422,
                "invalid_request",
                "multipart upload needs the safetensors file in the form field 'file'",
                field="file",
            )
        return await upload.read(), f"upload {upload.filename or 'file'}"
    finally:
        await form.close()


@router.get(
    "/{set_id}",
    response_model=EmbeddingSetOut,
    responses={404: {"model": ErrorOut}},
    summary="Summary of a stored embedding set",
)
def get_embedding_set(set_id: str, store: StoreDep) -> dict:
    return store.describe(set_id)
