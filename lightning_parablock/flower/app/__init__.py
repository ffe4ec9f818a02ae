"""The folder ``flwr run`` bundles (``pyproject.toml`` names the apps in :mod:`.parablock_app`)."""
