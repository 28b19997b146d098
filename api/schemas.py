"""Response shapes bound to the current request (links use the public base URL)."""

from __future__ import annotations

from typing import Any

from flask import request

from api.context import settings
from segsvc.models import Job
from segsvc.serialize import job_json, job_urls


def base_url() -> str:
    """The public base URL for links: the setting, else the request's host."""
    return (settings().public_url or request.host_url).rstrip("/")


def job_body(job: Job) -> dict[str, Any]:
    """A job as the API returns it."""
    return job_json(job, base_url=base_url())


def accepted_body(job: Job) -> dict[str, Any]:
    """The 202 answer to a submission."""
    return {
        "id": str(job.id),
        "status": job.status,
        "created_at": job_body(job)["created_at"],
        "urls": job_urls(job.id, base_url=base_url()),
    }
