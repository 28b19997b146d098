"""/v1/jobs/<id>/feedback: a rating and/or a corrected mask for a finished job."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from api.auth import authenticate_request, current_client
from api.context import db, settings
from api.routes.jobs import (
    check_fields_are_text,
    check_files_are_files,
    check_single,
    large_decode_turn,
)
from segsvc.errors import PayloadTooLargeError
from segsvc.models import Feedback
from segsvc.serialize import iso
from segsvc.services import feedback as feedback_service
from segsvc.services import limits

bp = Blueprint("feedback", __name__, url_prefix="/v1")
bp.before_request(authenticate_request)


@bp.post("/jobs/<job_id>/feedback")
def post_feedback(job_id: str) -> tuple[Response, int]:
    """Validate and store feedback; the mask must match the input's size with values 0..2.

    Each post takes one of the key's submission tokens (a mask is decoded, as an upload is)."""
    cfg = settings()
    limits.check_rate(client_key=str(current_client().id), settings=cfg)
    check_files_are_files("mask")
    check_fields_are_text("rating")
    check_single("mask", "rating")
    upload = request.files.get("mask")
    limit = cfg.max_upload_bytes
    mask = upload.read(limit + 1) if upload is not None else None
    if mask is not None and len(mask) > limit:
        raise PayloadTooLargeError(f"The mask is larger than the limit of {limit} bytes.")
    session = db()
    row = feedback_service.submit_feedback(
        session=session,
        job_id=job_id,
        client_id=current_client().id,
        mask_png=mask,
        rating=request.form.get("rating"),
        large_decode=large_decode_turn,
    )
    session.commit()
    return jsonify(feedback_body(row)), 201


def feedback_body(row: Feedback) -> dict[str, Any]:
    """Feedback as the API returns it (never the mask bytes)."""
    return {
        "id": str(row.id),
        "job_id": str(row.job_id),
        "model_version": row.model_version,
        "rating": row.rating,
        "has_mask": row.mask_png is not None,
        "created_at": iso(row.created_at),
    }
