"""Webhook delivery: SSRF-safe targets, Standard Webhooks signing, retry schedule, one attempt."""
