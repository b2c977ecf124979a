"""deltatalk's inference engine: GGUF files run from their quantized blocks with numba.

This package never imports `chatapp`.
"""
