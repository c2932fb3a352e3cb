"""Building blocks every model family shares: norms, rotary embedding, the attention core, SwiGLU,
the MoE layer (routers, dispatch, expert banks, shared experts), seeded initialisation, the
chunked loss and weight casts.

Import the modules directly (``from megamoe.nn.moe.layer import MoELayer``); this package file
stays empty so that sub-packages can import each other without a cycle.
"""
