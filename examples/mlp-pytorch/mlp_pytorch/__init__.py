"""A Flower app: a multilayer perceptron trained with FedSGD-like rounds on IID partitions of CIFAR-10."""
