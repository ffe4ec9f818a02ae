"""The Lightning strategies (ParaBlock/FedBCD, FLoRA, FedCyBGD) and the parts they delegate to."""
