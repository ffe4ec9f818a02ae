"""The methods of the paper's Table 1 as settings of the same strategy, callback and module."""
