"""Scale to zero and warm-up (seed 003, Hypnus): what wakes a unit's AppServers, lets them sleep,
and starts them ahead of demand; the scalers (local nodes, Kubernetes) behind one interface."""
