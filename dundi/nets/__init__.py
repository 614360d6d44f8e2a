"""The networks: native softmax models, the Distance NN, batched forward passes."""
