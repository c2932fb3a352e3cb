"""The Yuan 2.0 decoder in plain PyTorch: norms, rotary embedding, LFA attention, MoE FFN.

Import the modules directly (``from megamoe.model.yuan import YuanModel``); this package file
stays empty so that the MoE sub-package can import ``megamoe.model.init`` without a cycle.
"""
