"""Celery workers: inference (micro-batched) and webhook delivery."""
