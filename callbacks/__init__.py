"""Lightning callbacks that drive a compress controller."""
