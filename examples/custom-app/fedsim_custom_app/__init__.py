"""A Flower app that runs fedsim's strategies and client apps under Flower's deployment engine."""
