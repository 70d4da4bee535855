"""secagg-pytorch: a Flower app whose clients' updates reach the server only through SecAgg+."""
