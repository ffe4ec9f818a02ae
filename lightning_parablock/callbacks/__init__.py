"""Lightning callbacks: the exchange and the round boundary (ParaBlockCallback), and the per-round line."""
