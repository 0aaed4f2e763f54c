"""Filter pruning: channel groups from Torch-Pruning, structured masks, shrinking."""
