"""Choose resident sets: strategies, allocation, the planner, calibration, placement, offload budgets."""
