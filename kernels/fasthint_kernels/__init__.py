"""fasthint's kernel package: Triton kernels, the bounded-memory torch path and the references.

Imported as ``fasthint_kernels`` (never ``kernels``: that name belongs to Hugging Face's package,
which transformers imports on every model load). It depends only on torch (and triton for the
Triton kernels). The public API with dispatch is ``fasthint.ops``.
"""
