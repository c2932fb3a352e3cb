"""What a config costs before anything launches: FLOPs (flops), memory per GPU (memory), the stage
split that balances them (balance), and the layout planner built on all three (planner).

A one-way chain: flops and memory know nothing of the split; balance resolves it; planner ranks
layouts with all of them."""
