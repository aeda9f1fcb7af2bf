"""Triton kernels of lxmert_fast, installed as ``lxmert_fast.kernels``.

One file per kernel: the ``@triton.jit`` kernels, then host launchers, then the autograd
Function. Importing a kernel module registers it with the dispatcher
(:mod:`lxmert_fast.ops`); set ``TRITON_INTERPRET=1`` before the import to run the kernels on
the CPU.
"""
