"""The MoE layer: router, local experts, shared expert, EPMoE, and the references it is checked against."""
