"""What crosses the link: the modelled link, codecs, the in-memory and torch.distributed transports, and the thread
that runs them beside training.
"""
