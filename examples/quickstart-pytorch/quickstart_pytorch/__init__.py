"""A Flower app: a CNN trained with FedAvg over IID partitions of CIFAR-10."""
