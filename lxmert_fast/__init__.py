"""lxmert_fast: LXMERT with fused kernels, exact checkpoint compatibility and ZeRO pre-training."""

from lxmert_fast.backend import BackendUnavailableError, current_backend, set_backend, use_backend

__all__ = ["BackendUnavailableError", "current_backend", "set_backend", "use_backend"]
