from tests.segsvc.webhooks.receiver import hook_settings, receiver

__all__ = ["hook_settings", "receiver"]
