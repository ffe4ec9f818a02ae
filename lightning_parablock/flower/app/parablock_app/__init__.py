"""The Flower App that ``flwr run`` ships to the coordinator and the sites: the mailbox ClientApp, the ServerApp and
the wire protocol between a ClientApp and its site's trainer. Imports nothing: the ClientApp starts once per
message."""
