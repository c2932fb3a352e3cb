"""How the model is spread over processes: mesh, pipeline stages, expert placement, grad sync."""
