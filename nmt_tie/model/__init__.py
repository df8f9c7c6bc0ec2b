"""Models: the tying module, the attention RNN, the Transformer, and the builder."""
