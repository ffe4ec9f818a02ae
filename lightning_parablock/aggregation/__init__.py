"""How the server combines a round's client deltas: pure rules, the one non-finite policy, the aggregators."""
