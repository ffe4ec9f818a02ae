"""ParaBlock across organizations: a Flower transport that keeps the overlap.

Each site runs its own long-lived trainer (``FlowerSite``) next to a Flower SuperNode; the coordinator runs the
SuperLink and ``flwr run`` starts the server (:mod:`.server`). Flower is an optional extra:
``pip install 'lightning_parablock[flower]'`` (Python >= 3.11).
"""
