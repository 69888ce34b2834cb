"""The DP-LDM family (DPImageBench's DP-LDM, DP-LDM-SD and DP-LoRA): a generator pretrained on
public data, of which DP-SGD trains only a small part (attention and conditioning, or LoRA
adapters); everything else is frozen with requires_grad=False."""
